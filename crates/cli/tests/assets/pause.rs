// The test sandbox image's only program, built static by tests/harness/containerd.rs.
// As PID 1 of its PID namespace it ignores any signal it has no handler for, so it installs
// one for SIGTERM and SIGINT and sleeps until one arrives (the runtime may also SIGKILL it).

unsafe extern "C" {
    fn signal(signum: i32, handler: extern "C" fn(i32)) -> usize;
    fn pause() -> i32;
    fn _exit(status: i32) -> !;
}

extern "C" fn stop(_: i32) {
    unsafe { _exit(0) }
}

fn main() {
    unsafe {
        signal(15, stop);
        signal(2, stop);
        loop {
            pause();
        }
    }
}
