"""`python -m clipforge ...` is the same as the `clipforge` console script."""
from clipforge.cli import main

if __name__ == "__main__":
    main()
