from embedfleet.cli import main

main(prog_name="embedfleet")
