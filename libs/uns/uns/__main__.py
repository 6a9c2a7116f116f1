from uns.cli import main

main()
