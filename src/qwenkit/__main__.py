from qwenkit.cli.app import main

main()
