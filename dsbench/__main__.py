from dsbench.cli import main

main()
