//! The `starling` binary: parse, dispatch, print the error chain on one line.

use clap::Parser;
use starling::cli::{Cli, Command};
use std::process::ExitCode;

fn main() -> ExitCode {
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(e) => return argument_error(e),
    };
    if let Err(e) = pin_thread_count(cli.command.threads()) {
        eprintln!("error: {e}");
        return ExitCode::from(2);
    }
    let dispatch = || match &cli.command {
        Command::Run(args) => starling::commands::run::run(args),
        Command::Chat(args) => starling::commands::chat::run(args),
        Command::Tokenize(args) => starling::commands::tokenize::run(args),
        Command::Pull(args) => starling::commands::models::pull(args),
        Command::List => starling::commands::models::list(),
        Command::Rm(args) => starling::commands::models::rm(args),
        Command::Bench(args) => starling::commands::bench::run(args),
        Command::Serve(args) => starling::commands::serve::run(args),
        Command::Quantize(args) => starling::commands::quantize::run(args),
        Command::Score(args) => starling::commands::score::run(args),
    };
    // The command runs on a worker of the compute pool, so the matrix
    // products it starts split their rows between it and the other workers
    // rather than handing them all to the pool and sleeping until they are
    // done: a wake-up less per product, 225 products per token of a 7B
    // model (about 3% of its generation time on 2 threads). The stack is
    // the main thread's size.
    let pool = rayon::ThreadPoolBuilder::new()
        .stack_size(8 << 20)
        .thread_name(|i| format!("starling-compute-{i}"))
        .build();
    let result = match pool {
        Ok(pool) => pool.install(dispatch),
        Err(_) => dispatch(),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        // A reader that went away (`| head`) is not an error worth a message.
        Err(e) if starling::commands::is_broken_pipe(&e) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {}", starling::commands::error_line(&e));
            ExitCode::FAILURE
        }
    }
}

/// Help and version go out as clap writes them; a wrong argument is one
/// line (clap's first), like every other error, and exit code 2.
fn argument_error(e: clap::Error) -> ExitCode {
    use clap::error::ErrorKind;
    if matches!(
        e.kind(),
        ErrorKind::DisplayHelp
            | ErrorKind::DisplayVersion
            | ErrorKind::DisplayHelpOnMissingArgumentOrSubcommand
    ) {
        e.exit();
    }
    // clap's message is its first paragraph (a list of missing arguments
    // continues on indented lines); the usage and tips after it are dropped.
    let text = e.render().to_string();
    let message = text
        .lines()
        .take_while(|l| !l.trim().is_empty())
        .map(str::trim)
        .collect::<Vec<_>>()
        .join(" ");
    let message = message.strip_prefix("error: ").unwrap_or(&message);
    eprintln!("error: {message} (see starling --help)");
    ExitCode::from(2)
}

/// candle asks for the thread count on every CPU matmul, and without
/// RAYON_NUM_THREADS it re-reads /proc/cpuinfo each time (a measured 8% of a
/// decode step on a small model). Resolve it once, from `--threads` or the
/// default (physical cores, within the CPUs the process may use), before
/// any compute thread starts.
/// RAYON_NUM_THREADS from the environment is checked like `--threads`.
fn pin_thread_count(threads: Option<u16>) -> Result<(), String> {
    let max = starling::cli::MAX_THREADS;
    let n = match threads {
        Some(n) => n.to_string(),
        None => match std::env::var("RAYON_NUM_THREADS") {
            Ok(value) => {
                return match value.trim().parse::<u16>() {
                    // 0 is rayon's "the default".
                    Ok(n) if n <= max => Ok(()),
                    _ => Err(format!(
                        "RAYON_NUM_THREADS={value:?} is not a thread count from 0 to {max}"
                    )),
                };
            }
            // Physical cores, but no more than the CPUs this process may
            // use (`taskset`, a container's cpuset or quota).
            Err(_) => candle_core::utils::get_num_threads()
                .min(std::thread::available_parallelism().map_or(1, |n| n.get()))
                .min(max as usize)
                .to_string(),
        },
    };
    // SAFETY: called in main before any other thread exists (argument parsing spawns none).
    unsafe { std::env::set_var("RAYON_NUM_THREADS", n) };
    Ok(())
}
