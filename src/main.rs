//! The `vstor` command line.

mod cli;

use clap::Parser;

use std::process::ExitCode;

fn main() -> ExitCode {
    // Output into a closed pipe (`vstor disk read ... | head`) ends the process quietly, as
    // for every Unix filter, instead of a panic from println!.
    // SAFETY: signal(2) with SIG_DFL installs no handler; it runs before any thread starts.
    unsafe {
        libc::signal(libc::SIGPIPE, libc::SIG_DFL);
    }
    let args = match cli::Cli::try_parse() {
        Ok(a) => a,
        Err(e) if e.use_stderr() => {
            // Usage errors: one line with the cause, exit status 2 (as clap and getopt tools do).
            let rendered = e.render().to_string();
            let first = rendered.lines().next().unwrap_or("invalid arguments");
            let first = first.strip_prefix("error: ").unwrap_or(first);
            eprintln!("vstor: error: {first} (see --help)");
            return ExitCode::from(2);
        }
        Err(e) => e.exit(), // --help and --version
    };
    match cli::run(args) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            // One line: the cause, nothing else.
            let msg = e.to_string().replace('\n', "; ");
            eprintln!("vstor: error: {msg}");
            exit_code(e.kind())
        }
    }
}

/// The exit status for a failure of this kind: 75 (EX_TEMPFAIL) when the image is in use by
/// another process, so that a supervisor can tell "try again later" from a real failure; 2 for
/// input that makes no sense, as for usage errors; 1 for everything else.
fn exit_code(kind: vstor::ErrorKind) -> ExitCode {
    match kind {
        vstor::ErrorKind::InUse => ExitCode::from(75),
        vstor::ErrorKind::InvalidInput => ExitCode::from(2),
        _ => ExitCode::FAILURE,
    }
}
