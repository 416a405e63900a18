"""lazypaged: post-copy memory restore over userfaultfd."""

__version__ = "0.1.0"
