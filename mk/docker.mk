# Container image, Spot Extension (.spx) and the container smoke test. No registry is needed:
# packaging/docker-ready.sh starts Docker and makes the Debian base image with debootstrap, and
# packaging/wheels.sh fetches the pinned wheels on the host.
VERSION := $(shell sed -n 's/^__version__ = "\(.*\)"/\1/p' extension/spotrelay/__init__.py)
IMAGE := spotrelay:$(VERSION)
NATIVE_ARCH := $(shell dpkg --print-architecture 2>/dev/null || echo amd64)
SPX := dist/spotrelay-$(VERSION).spx
IMAGE_ARCHIVE := dist/spotrelay-image-arm64.tar.gz

.PHONY: image image-arm64 spx check-spx docker-test arm64-test

## Image for this machine's architecture, tagged spotrelay:VERSION (what docker-compose.yml runs).
image:
	@base=$$(packaging/docker-ready.sh $(NATIVE_ARCH)) && packaging/wheels.sh $(NATIVE_ARCH) && \
	docker build -q -t $(IMAGE) -t $(IMAGE)-$(NATIVE_ARCH) --build-arg BASE=$$base \
	  --build-arg WHEELS=.cache/wheels/$(NATIVE_ARCH) . && \
	echo "image: $(IMAGE) ($(NATIVE_ARCH))"

## Image for the CORE I/O (linux/arm64), built under qemu emulation: spotrelay:VERSION-arm64.
image-arm64:
	@base=$$(packaging/docker-ready.sh arm64) && packaging/wheels.sh arm64 && \
	docker build -q --platform linux/arm64 -t $(IMAGE)-arm64 --build-arg BASE=$$base \
	  --build-arg WHEELS=.cache/wheels/arm64 . && \
	echo "image: $(IMAGE)-arm64 (arm64)"

## The Spot Extension: arm64 image saved as spotrelay:VERSION, packed with manifest, compose, icon.
spx: image-arm64
	@mkdir -p dist
	docker tag $(IMAGE)-arm64 $(IMAGE)
	docker save $(IMAGE) | gzip -9 > $(IMAGE_ARCHIVE)
	@docker tag $(IMAGE)-$(NATIVE_ARCH) $(IMAGE) 2>/dev/null || docker rmi $(IMAGE) >/dev/null
	$(PY) packaging/spx.py pack --image-archive $(IMAGE_ARCHIVE) --out $(SPX)
	$(PY) packaging/spx.py check --arch arm64 $(SPX)

check-spx:
	$(PY) packaging/spx.py check --arch arm64 $(SPX)

## The arm64 image starts under emulation and answers /healthz (with the built-in simulated robot).
arm64-test: image-arm64
	packaging/health.sh $(IMAGE)-arm64 linux/arm64

## CI: build the native image and run docker-compose.yml against the simulated robot.
docker-test: image
	packaging/smoke.sh $(IMAGE)
