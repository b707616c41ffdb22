"""`python -m loam.mixsearch`: the mixture search, which lives in loam/mixing/search.py."""
from loam.mixing.search import main, run  # noqa: F401

if __name__ == "__main__":
    main()
