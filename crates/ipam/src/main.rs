//! The binary a container runtime executes. All logic lives in the library; this reads the
//! process's environment and stdin and writes the one JSON document to stdout.

use std::io::{Read, Write};

fn main() {
    let mut stdin = Vec::with_capacity(16 * 1024);
    if let Err(e) = std::io::stdin().read_to_end(&mut stdin) {
        // Still answer: an unreadable stdin decodes as an empty (invalid) config.
        eprintln!("allot-ipam: reading stdin: {e}");
    }
    let var = |k: &str| std::env::var(k).ok();
    let (out, code) = allot_ipam::run(&var, &stdin);
    let mut stdout = std::io::stdout().lock();
    let _ = stdout.write_all(out.as_bytes());
    let _ = stdout.flush();
    std::process::exit(code);
}
