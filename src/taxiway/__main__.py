from taxiway.cli.main import main

main()
