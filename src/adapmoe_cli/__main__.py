from adapmoe_cli.cli.app import main

main()
