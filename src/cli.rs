//! Command-line types (clap) and their translation into library options.
