//! The `edgelm` binary: parse arguments, call the library, map errors to exit codes.

use std::process::ExitCode;

use clap::Parser;
use edgelm::cli::{Cli, Command};

fn main() -> ExitCode {
    let cli = Cli::parse();
    edgelm::logger::init(cli.verbose);
    if matches!(cli.command, Command::Run(_) | Command::Serve(_)) {
        if let Err(e) = edgelm::signal::install() {
            eprintln!("edgelm: installing the SIGTERM handler: {e}");
            return ExitCode::FAILURE;
        }
    }
    let result = match &cli.command {
        Command::Run(args) => args
            .to_options()
            .and_then(|o| edgelm::run::run(&o, &mut std::io::stdout().lock())),
        Command::Chat(args) => args.to_options().and_then(|o| {
            edgelm::chat::chat(
                &o,
                &mut std::io::stdin().lock(),
                &mut std::io::stdout().lock(),
            )
        }),
        Command::Convert(args) => edgelm::convert::convert(&args.to_options()).map(|_| ()),
        Command::Info(args) => args
            .to_options()
            .and_then(|o| edgelm::info::run(&o, &mut std::io::stdout().lock())),
        Command::Bench(args) => args
            .to_options()
            .and_then(|o| edgelm::bench::run(&o, &mut std::io::stdout().lock())),
        Command::Serve(args) => args.to_options().and_then(|o| edgelm::serve::serve(&o)),
        Command::Tokenize(args) => {
            edgelm::tokenize::tokenize(&args.to_options(), &mut std::io::stdout().lock())
        }
        Command::Template(args) => args
            .to_options()
            .and_then(|o| edgelm::template::prompt::template(&o, &mut std::io::stdout().lock())),
        Command::Perplexity(args) => args
            .to_options()
            .and_then(|o| edgelm::perplexity::run(&o, &mut std::io::stdout().lock())),
    };
    match result {
        // A `run` cut short by a signal still finished cleanly, but did not do all it was
        // asked; a stopped `serve` is a normal end.
        Ok(()) => match edgelm::signal::received() {
            Some(sig) if matches!(cli.command, Command::Run(_)) => {
                ExitCode::from(128u8.wrapping_add(sig as u8))
            }
            _ => ExitCode::SUCCESS,
        },
        Err(e) if is_broken_pipe(&e) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("edgelm: {e:#}");
            ExitCode::FAILURE
        }
    }
}

/// A closed stdout (`edgelm run ... | head`) is not an error worth a message.
fn is_broken_pipe(e: &anyhow::Error) -> bool {
    e.chain().any(|c| {
        c.downcast_ref::<std::io::Error>()
            .is_some_and(|io| io.kind() == std::io::ErrorKind::BrokenPipe)
    })
}
