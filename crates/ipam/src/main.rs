//! The binary a container runtime executes. All logic lives in the library; this reads the
//! process's environment and stdin and writes the one JSON document to stdout.

use std::io::Write;

fn main() {
    let (out, code) = match allot_ipam::read_stdin(&mut std::io::stdin().lock()) {
        Ok(stdin) => allot_ipam::run(&|k: &str| std::env::var(k).ok(), &stdin),
        Err(e) => (e.to_json(allot_ipam::LATEST), 1),
    };
    let mut stdout = std::io::stdout().lock();
    let _ = stdout.write_all(out.as_bytes());
    let _ = stdout.flush();
    std::process::exit(code);
}
