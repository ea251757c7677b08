"""`python -m flexmoe.cli ...` (also under torchrun)."""

from flexmoe.cli import main

if __name__ == "__main__":
    main()
