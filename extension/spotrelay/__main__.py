from spotrelay.main import main

main()
