from nzgw.cli import main

main(prog_name="nzgw")
