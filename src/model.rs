//! The only file that touches tract: load (mmap), rewrite, optimize, forward.
