//! `allot kkp validate`: KKP's Cluster rules offline, on files (what the webhook checks).

use std::path::{Path, PathBuf};

use allot_kkp::{Cluster, Denial};
use clap::ValueEnum;

#[derive(clap::Subcommand)]
pub enum KkpCmd {
    /// Check a Kubermatic Cluster (create: --new only; update: --old and --new) against KKP's
    /// rules. Exit 0: allowed; 1: denied (every reason printed); 2: unreadable or invalid input.
    Validate(ValidateArgs),
}

#[derive(Clone, Copy, Default, PartialEq, Eq, ValueEnum)]
pub enum Output {
    #[default]
    Text,
    Json,
}

#[derive(clap::Args)]
pub struct ValidateArgs {
    /// The Cluster as stored now (YAML or JSON, as `kubectl get cluster NAME -o yaml` prints
    /// it). Leave out to check a create.
    #[arg(long, value_name = "FILE")]
    old: Option<PathBuf>,
    /// The Cluster as it would be after the change (`-` reads standard input).
    #[arg(long, value_name = "FILE")]
    new: PathBuf,
    #[arg(short, long, value_enum, default_value_t = Output::Text)]
    output: Output,
}

fn read(path: &Path) -> Result<Cluster, String> {
    let text = if path == Path::new("-") {
        std::io::read_to_string(std::io::stdin()).map_err(|e| format!("standard input: {e}"))?
    } else {
        std::fs::read_to_string(path).map_err(|e| format!("{}: {e}", path.display()))?
    };
    Cluster::from_yaml(&text).map_err(|e| format!("{}: {e}", path.display()))
}

/// Returns the exit code: 0 allowed, 1 denied, 2 bad input.
pub fn exec(cmd: KkpCmd) -> i32 {
    let KkpCmd::Validate(args) = cmd;
    let old = match args.old.as_deref().map(read).transpose() {
        Ok(o) => o,
        Err(e) => return bad_input(&e),
    };
    let new = match read(&args.new) {
        Ok(n) => n,
        Err(e) => return bad_input(&e),
    };
    let denials = allot_kkp::validate(old.as_ref(), &new);
    print(args.output, &denials);
    if denials.is_empty() { 0 } else { 1 }
}

fn bad_input(e: &str) -> i32 {
    eprintln!("error: {e}");
    2
}

fn print(output: Output, denials: &[Denial]) {
    let text = match output {
        Output::Json => {
            let v = serde_json::json!({"allowed": denials.is_empty(), "denials": denials});
            serde_json::to_string_pretty(&v).expect("JSON of strings") + "\n"
        }
        Output::Text if denials.is_empty() => "allowed\n".to_string(),
        Output::Text => {
            let mut s = format!("denied ({} reason{}):\n", denials.len(), if denials.len() == 1 { "" } else { "s" });
            for d in denials {
                s.push_str(&format!("  {}: {}\n", d.rule, d.message));
            }
            s
        }
    };
    use std::io::Write;
    let mut out = std::io::stdout().lock();
    // A closed stdout (`| head`) is not worth a panic; the exit code still tells.
    let _ = out.write_all(text.as_bytes()).and_then(|_| out.flush());
}
