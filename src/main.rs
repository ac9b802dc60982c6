//! The `edgelm` binary: parse arguments, call the library, map errors to exit codes.

use std::process::ExitCode;

use clap::Parser;
use edgelm::cli::{Cli, Command};

fn main() -> ExitCode {
    let cli = Cli::parse();
    edgelm::logger::init(cli.verbose);
    let result = match &cli.command {
        Command::Run(args) => edgelm::run::run(args, &mut std::io::stdout().lock()),
        Command::Chat(args) => edgelm::chat::chat(
            args,
            &mut std::io::stdin().lock(),
            &mut std::io::stdout().lock(),
        ),
        Command::Convert(args) => edgelm::convert::convert(&args.to_options()).map(|_| ()),
        Command::Info(args) => edgelm::info::run(args, &mut std::io::stdout().lock()),
        Command::Bench(args) => edgelm::bench::run(args, &mut std::io::stdout().lock()),
        Command::Serve(args) => args.to_options().and_then(|o| edgelm::serve::serve(&o)),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
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
