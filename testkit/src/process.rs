//! Child processes a test starts: killed when the test lets go of them.

use std::process::{Child, ExitStatus};
use std::time::{Duration, Instant};

/// A child process killed (SIGKILL) and reaped when dropped.
pub struct ChildGuard(Option<Child>);

impl ChildGuard {
    pub fn new(child: Child) -> Self {
        Self(Some(child))
    }

    pub fn id(&self) -> u32 {
        self.child_ref().id()
    }

    fn child_ref(&self) -> &Child {
        self.0.as_ref().expect("the child was taken")
    }

    pub fn child(&mut self) -> &mut Child {
        self.0.as_mut().expect("the child was taken")
    }

    /// Its exit status if it has ended, without waiting.
    pub fn try_wait(&mut self) -> Option<ExitStatus> {
        self.child().try_wait().expect("waitpid")
    }

    pub fn is_running(&mut self) -> bool {
        self.0.is_some() && self.try_wait().is_none()
    }

    /// Waits for it to end; fails the test after `timeout`.
    pub fn wait_timeout(&mut self, what: &str, timeout: Duration) -> ExitStatus {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(st) = self.try_wait() {
                return st;
            }
            assert!(
                Instant::now() < deadline,
                "{what} did not end within {timeout:?}"
            );
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// SIGKILL, then reaps it.
    pub fn kill(&mut self) -> ExitStatus {
        let c = self.child();
        let _ = c.kill();
        c.wait().expect("waitpid")
    }

    /// SIGTERM; SIGKILL if it has not ended after `grace`.
    pub fn terminate(&mut self, grace: Duration) -> ExitStatus {
        let pid = self.id() as libc::pid_t;
        // SAFETY: kill(2) with the pid of our own unreaped child (it cannot
        // have been recycled) and a constant signal; no memory is touched.
        unsafe { libc::kill(pid, libc::SIGTERM) };
        let deadline = Instant::now() + grace;
        while Instant::now() < deadline {
            if let Some(st) = self.try_wait() {
                return st;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        self.kill()
    }

    /// Gives the child back (it is no longer killed on drop).
    pub fn into_inner(mut self) -> Child {
        self.0.take().expect("the child was taken")
    }
}

impl Drop for ChildGuard {
    fn drop(&mut self) {
        if let Some(mut c) = self.0.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// Did the process die of SIGKILL (a fault point, or a test's kill)?
pub fn killed(st: &ExitStatus) -> bool {
    use std::os::unix::process::ExitStatusExt;
    st.signal() == Some(libc::SIGKILL)
}
