from nzgw.cli import main

main()
