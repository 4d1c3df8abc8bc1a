//! A database as a workload: [`SqliteWriter`] commits one insert per
//! transaction (WAL, `synchronous=FULL`, so each commit is durable when it
//! returns) in a thread, remembers the last committed row, and
//! [`check_rows`] proves every committed transaction is in the database
//! with its content.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use rusqlite::{Connection, OpenFlags, params};

/// A row's content, a function of its key (so the check needs no model).
fn content(i: i64) -> String {
    format!("{i:0>12}-").repeat(40)
}

#[derive(Default)]
struct Shared {
    stop: AtomicBool,
    /// The last committed row, -1 before the first.
    committed: AtomicI64,
    /// Slowest commit, microseconds.
    max_us: AtomicU64,
}

/// A thread inserting rows `0, 1, 2...` into table `t` of `db`, each in
/// its own transaction.
pub struct SqliteWriter {
    db: PathBuf,
    shared: Arc<Shared>,
    thread: Option<std::thread::JoinHandle<Result<(), String>>>,
}

fn open(db: &Path) -> rusqlite::Result<Connection> {
    let c = Connection::open(db)?;
    let mode: String = c.query_row("PRAGMA journal_mode=WAL", [], |r| r.get(0))?;
    assert_eq!(mode, "wal", "{}: WAL journal", db.display());
    c.execute_batch(
        "PRAGMA synchronous=FULL;
         CREATE TABLE IF NOT EXISTS t(i INTEGER PRIMARY KEY, v TEXT NOT NULL);",
    )?;
    Ok(c)
}

impl SqliteWriter {
    /// Starts writing to `db` (made if missing).
    pub fn start(db: &Path) -> Self {
        Self::resume(db, -1)
    }

    /// Goes on writing to `db`, whose rows up to `committed` a writer
    /// committed before.
    pub fn resume(db: &Path, committed: i64) -> Self {
        let shared = Arc::new(Shared {
            committed: AtomicI64::new(committed),
            ..Shared::default()
        });
        let (s, path) = (shared.clone(), db.to_path_buf());
        let thread = std::thread::Builder::new()
            .name("sqlite-writer".into())
            .spawn(move || {
                let c = open(&path).map_err(|e| format!("opening {}: {e}", path.display()))?;
                let mut i = committed + 1;
                while !s.stop.load(Ordering::SeqCst) {
                    let t = Instant::now();
                    c.execute(
                        "INSERT INTO t(i, v) VALUES (?1, ?2)",
                        params![i, content(i)],
                    )
                    .map_err(|e| format!("committing row {i}: {e}"))?;
                    s.max_us
                        .fetch_max(t.elapsed().as_micros() as u64, Ordering::SeqCst);
                    s.committed.store(i, Ordering::SeqCst);
                    i += 1;
                }
                // A clean close checkpoints the WAL into the database file.
                c.close().map_err(|(_, e)| format!("closing: {e}"))
            })
            .unwrap();
        Self {
            db: db.to_path_buf(),
            shared,
            thread: Some(thread),
        }
    }

    /// The last committed row (-1: none yet).
    pub fn committed(&self) -> i64 {
        self.shared.committed.load(Ordering::SeqCst)
    }

    /// The slowest commit so far.
    pub fn max_latency(&self) -> Duration {
        Duration::from_micros(self.shared.max_us.load(Ordering::SeqCst))
    }

    /// Panics with the writer's error if it stopped.
    pub fn check_alive(&mut self) {
        if self.thread.as_ref().is_some_and(|t| t.is_finished()) {
            let r = self.thread.take().unwrap().join().unwrap();
            panic!("the SQLite writer on {} stopped: {r:?}", self.db.display());
        }
    }

    /// Waits until `n` more transactions committed after now.
    pub fn wait_commits(&mut self, n: i64, timeout: Duration) {
        let goal = self.committed() + n;
        let deadline = Instant::now() + timeout;
        while self.committed() < goal {
            self.check_alive();
            assert!(
                Instant::now() < deadline,
                "the SQLite writer committed {} of {goal} rows in {timeout:?}",
                self.committed()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Stops, closes the database; panics if any commit failed. Returns the
    /// last committed row.
    pub fn stop(mut self) -> i64 {
        self.shared.stop.store(true, Ordering::SeqCst);
        let r = self.thread.take().unwrap().join().unwrap();
        if let Err(e) = r {
            panic!("the SQLite writer on {}: {e}", self.db.display());
        }
        self.committed()
    }
}

impl Drop for SqliteWriter {
    fn drop(&mut self) {
        self.shared.stop.store(true, Ordering::SeqCst);
    }
}

/// Every row up to `committed` is in `db` with its content, and the
/// database passes `PRAGMA integrity_check`. `read_only`: open it
/// immutable (a read-only mount). Returns the number of rows.
pub fn check_rows(db: &Path, committed: i64, read_only: bool) -> i64 {
    let c = if read_only {
        let uri = format!("file:{}?immutable=1", db.display());
        Connection::open_with_flags(
            uri,
            OpenFlags::SQLITE_OPEN_READ_ONLY | OpenFlags::SQLITE_OPEN_URI,
        )
    } else {
        Connection::open(db)
    }
    .unwrap_or_else(|e| panic!("opening {}: {e}", db.display()));
    let ok: String = c
        .query_row("PRAGMA integrity_check", [], |r| r.get(0))
        .unwrap();
    assert_eq!(ok, "ok", "{}: integrity check", db.display());
    let mut st = c
        .prepare("SELECT i, v FROM t WHERE i <= ?1 ORDER BY i")
        .unwrap();
    let mut rows = st.query(params![committed]).unwrap();
    let mut want = 0i64;
    while let Some(r) = rows.next().unwrap() {
        let (i, v): (i64, String) = (r.get(0).unwrap(), r.get(1).unwrap());
        assert_eq!(i, want, "{}: committed row {want} is missing", db.display());
        assert!(
            v == content(i),
            "{}: row {i} has other content",
            db.display()
        );
        want += 1;
    }
    assert_eq!(
        want - 1,
        committed,
        "{}: rows after {} are missing",
        db.display(),
        want - 1
    );
    c.query_row("SELECT count(*) FROM t", [], |r| r.get(0))
        .unwrap()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn committed_rows_are_checked_and_a_lost_one_is_found() {
        let dir = tempfile::tempdir().unwrap();
        let db = dir.path().join("db");
        let mut w = SqliteWriter::start(&db);
        w.wait_commits(50, Duration::from_secs(60));
        let last = w.stop();
        assert!(last >= 49);
        assert_eq!(check_rows(&db, last, false), last + 1);
        assert_eq!(check_rows(&db, last, true), last + 1);
        // A committed transaction lost: the check says so.
        let c = Connection::open(&db).unwrap();
        c.execute("DELETE FROM t WHERE i = 7", []).unwrap();
        drop(c);
        let lost = std::panic::catch_unwind(|| check_rows(&db, last, false));
        assert!(lost.is_err(), "a missing row must fail the check");
    }
}
