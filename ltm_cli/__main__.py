from ltm_cli.app import main

main()
