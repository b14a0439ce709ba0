from queuegate.cli import main

main()
