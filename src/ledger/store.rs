//! The ledger's storage: one row per request in SQLite (the embedded default, WAL) or
//! PostgreSQL (`postgres://`). Rows are written in batches by one task, off the request path;
//! `close` flushes what is queued. Schema changes are numbered migrations, applied at open.
//! Reads and PostgreSQL go through sqlx; SQLite's writes go through a connection of their
//! own on a thread of their own (`SqliteWriter`: rusqlite for the connection, SQLite's C API
//! for the inserts), binding each row's values where they lie.

use crate::Name;
use std::str::FromStr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, LazyLock};
use std::time::Duration;

use sqlx::postgres::{PgPool, PgPoolOptions};
use sqlx::sqlite::{
    SqliteConnectOptions, SqliteJournalMode, SqlitePool, SqlitePoolOptions, SqliteSynchronous,
};
use sqlx::Row;
use tokio::sync::{mpsc, oneshot};

/// A PostgreSQL pool, its first connection made within 10 s (a database still starting is
/// waited for). When none could be made, the error says why (refused, unknown host, bad
/// password), not only that the pool timed out.
async fn pg_pool(url: &str, max_connections: u32) -> Result<PgPool, String> {
    use sqlx::Connection;
    let failed = |e: sqlx::Error| format!("cannot open the PostgreSQL ledger: {e}");
    match PgPoolOptions::new()
        .max_connections(max_connections)
        .acquire_timeout(Duration::from_secs(10))
        .connect(url)
        .await
    {
        Ok(pool) => Ok(pool),
        // One more try, alone, for its error (a server that accepts and never answers
        // would hold it for ever: bounded too).
        Err(sqlx::Error::PoolTimedOut) => {
            match tokio::time::timeout(Duration::from_secs(5), sqlx::PgConnection::connect(url))
                .await
            {
                Ok(Err(e)) => Err(failed(e)),
                Ok(Ok(conn)) => {
                    let _ = conn.close().await;
                    Err(failed(sqlx::Error::PoolTimedOut))
                }
                Err(_) => Err(failed(sqlx::Error::PoolTimedOut)),
            }
        }
        Err(e) => Err(failed(e)),
    }
}

/// One request as the ledger keeps it.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct LedgerRow {
    pub ts_ms: i64,
    pub request_id: String,
    pub key: Name,
    pub team: Name,
    pub user: String,
    pub route: Name,
    pub deployment: Name,
    pub provider: Name,
    /// The operation's path (`chat/completions`); read back, the text stored.
    pub endpoint: std::borrow::Cow<'static, str>,
    pub status: u16,
    pub prompt_tokens: u64,
    pub cached_tokens: u64,
    pub completion_tokens: u64,
    pub cost_usd: f64,
    pub latency_ms: f64,
    pub ttft_ms: Option<f64>,
    pub cache_hit: bool,
    pub estimated: bool,
}

#[derive(Clone)]
pub enum Store {
    /// The pool reads (reports, budgets at start) and migrates; the writer writes (none when
    /// the ledger was opened for reading only, `Store::open_read_only`).
    Sqlite(SqlitePool, Option<SqliteWriter>),
    Postgres(PgPool),
}

/// Why a batch was not written.
#[derive(Debug, thiserror::Error)]
pub enum WriteError {
    #[error(transparent)]
    Sqlx(#[from] sqlx::Error),
    #[error(transparent)]
    Sqlite(#[from] rusqlite::Error),
    #[error("the SQLite ledger's writer thread is gone")]
    WriterGone,
    #[error("the ledger was opened for reading only")]
    ReadOnly,
}

const SQLITE_MIGRATIONS: &[&str] = &["CREATE TABLE IF NOT EXISTS requests (
        id INTEGER PRIMARY KEY AUTOINCREMENT,
        ts_ms INTEGER NOT NULL,
        request_id TEXT NOT NULL,
        key_name TEXT NOT NULL,
        team TEXT NOT NULL,
        client_user TEXT NOT NULL,
        route TEXT NOT NULL,
        deployment TEXT NOT NULL,
        provider TEXT NOT NULL,
        endpoint TEXT NOT NULL,
        status INTEGER NOT NULL,
        prompt_tokens INTEGER NOT NULL,
        cached_tokens INTEGER NOT NULL,
        completion_tokens INTEGER NOT NULL,
        cost_usd REAL NOT NULL,
        latency_ms REAL NOT NULL,
        ttft_ms REAL,
        cache_hit INTEGER NOT NULL,
        estimated INTEGER NOT NULL
    );
    CREATE INDEX IF NOT EXISTS requests_ts ON requests (ts_ms);
    CREATE INDEX IF NOT EXISTS requests_key_ts ON requests (key_name, ts_ms);
    CREATE INDEX IF NOT EXISTS requests_team_ts ON requests (team, ts_ms);"];

const POSTGRES_MIGRATIONS: &[&str] = &[
    "CREATE TABLE IF NOT EXISTS requests (
        id BIGSERIAL PRIMARY KEY,
        ts_ms BIGINT NOT NULL,
        request_id TEXT NOT NULL,
        key_name TEXT NOT NULL,
        team TEXT NOT NULL,
        client_user TEXT NOT NULL,
        route TEXT NOT NULL,
        deployment TEXT NOT NULL,
        provider TEXT NOT NULL,
        endpoint TEXT NOT NULL,
        status INTEGER NOT NULL,
        prompt_tokens BIGINT NOT NULL,
        cached_tokens BIGINT NOT NULL,
        completion_tokens BIGINT NOT NULL,
        cost_usd DOUBLE PRECISION NOT NULL,
        latency_ms DOUBLE PRECISION NOT NULL,
        ttft_ms DOUBLE PRECISION,
        cache_hit BOOLEAN NOT NULL,
        estimated BOOLEAN NOT NULL
    );
    CREATE INDEX IF NOT EXISTS requests_ts ON requests (ts_ms);
    CREATE INDEX IF NOT EXISTS requests_key_ts ON requests (key_name, ts_ms);
    CREATE INDEX IF NOT EXISTS requests_team_ts ON requests (team, ts_ms);",
    // Each batch's id, written in the batch's transaction: a batch whose COMMIT was applied
    // but whose answer never came back (a failover, a cut connection) is written again under
    // the same id, which this table takes once (`insert_postgres`).
    "CREATE TABLE IF NOT EXISTS ledger_batches (id TEXT PRIMARY KEY);",
];

/// How long a batch's id is kept (`ledger_batches`): far longer than a write is retried.
const BATCH_ID_KEPT_MS: i64 = 7 * 86_400_000;

/// A spend report's grouping.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum GroupBy {
    Key,
    Team,
    #[value(alias = "route")]
    Model,
    Deployment,
}

impl GroupBy {
    fn column(self) -> &'static str {
        match self {
            GroupBy::Key => "key_name",
            GroupBy::Team => "team",
            GroupBy::Model => "route",
            GroupBy::Deployment => "deployment",
        }
    }
}

/// One line of a spend report.
#[derive(Debug, Clone, Default, PartialEq, serde::Serialize)]
pub struct SpendLine {
    pub name: String,
    pub requests: i64,
    pub prompt_tokens: i64,
    pub cached_tokens: i64,
    pub completion_tokens: i64,
    pub cost_usd: f64,
    pub cache_hits: i64,
}

/// A spend sum: which rows count.
#[derive(Debug, Clone, Copy)]
pub enum Scope<'a> {
    Global,
    Key(&'a str),
    Team(&'a str),
}

impl Store {
    pub async fn open(url: &str) -> Result<Store, String> {
        if is_postgres(url) {
            let pool = pg_pool(url, 8).await?;
            migrate_postgres(&pool).await.map_err(migration_failed)?;
            return Ok(Store::Postgres(pool));
        }
        if in_memory_sqlite(url) {
            return Err("an in-memory SQLite ledger would lose every row at exit; \
                        give a file (sqlite://PATH)"
                .to_string());
        }
        let opts = SqliteConnectOptions::from_str(url)
            .map_err(|e| format!("bad SQLite ledger URL: {e}"))?
            .create_if_missing(true)
            .journal_mode(SqliteJournalMode::Wal)
            // In WAL mode NORMAL syncs at checkpoints, not at every commit: a committed batch
            // survives a crash of the process (it is in the OS's hands), and a power loss can
            // take the last commits, as it takes the rows still queued anyway.
            .synchronous(SqliteSynchronous::Normal)
            .busy_timeout(BUSY_TIMEOUT);
        // One connection kept for good (a report's), three more on demand: each is a thread
        // of sqlx's, whose priority is lowered once it exists. Writes have a connection of
        // their own (`SqliteWriter`).
        let pool = SqlitePoolOptions::new()
            // An in-process database does not go away between two uses: no ping (a
            // round-trip to the connection's thread) before each use.
            .test_before_acquire(false)
            .min_connections(1)
            .max_connections(4)
            .max_lifetime(None)
            .connect_with(opts.clone())
            .await
            .map_err(|e| format!("cannot open the SQLite ledger: {e}"))?;
        lower_sqlite_threads();
        // The table exists before the writer prepares its statements.
        migrate_sqlite(&pool).await.map_err(migration_failed)?;
        let writer = SqliteWriter::open(opts.get_filename().to_path_buf())
            .await
            .map_err(|e| format!("cannot open the SQLite ledger for writing: {e}"))?;
        Ok(Store::Sqlite(pool, Some(writer)))
    }

    /// Opens the ledger for reading only (`switchyard spend`): nothing is created, migrated or
    /// written, so a report runs beside a serving gateway, as a user who may only read the
    /// ledger, and a wrong path is an error rather than a new, empty ledger. The ledger must
    /// have been made (and migrated) by a gateway of this version.
    pub async fn open_read_only(url: &str) -> Result<Store, String> {
        let store = if is_postgres(url) {
            let pool = pg_pool(url, 1).await?;
            Store::Postgres(pool)
        } else {
            if in_memory_sqlite(url) {
                return Err("an in-memory SQLite ledger holds no spend to report".to_string());
            }
            let opts = SqliteConnectOptions::from_str(url)
                .map_err(|e| format!("bad SQLite ledger URL: {e}"))?
                .read_only(true)
                .create_if_missing(false)
                .busy_timeout(BUSY_TIMEOUT);
            let file = opts.get_filename();
            if !file.exists() {
                return Err(format!(
                    "no ledger at {}: the gateway makes it when it first starts with this \
                     config (state.ledger; a relative path is read from the current folder)",
                    file.display()
                ));
            }
            let pool = SqlitePoolOptions::new()
                .max_connections(1)
                .connect_with(opts)
                .await
                .map_err(|e| format!("cannot open the SQLite ledger for reading: {e}"))?;
            Store::Sqlite(pool, None)
        };
        let (version, latest) = match &store {
            Store::Sqlite(pool, _) => (schema_version(pool).await, SQLITE_MIGRATIONS.len()),
            Store::Postgres(pool) => (schema_version(pool).await, POSTGRES_MIGRATIONS.len()),
        };
        let refused = match version {
            Ok(v) if v == latest as i64 => return Ok(store),
            Ok(v) if v > latest as i64 => {
                "the ledger was written by a newer switchyard; report with that version".into()
            }
            Ok(_) => "the ledger was written by an older switchyard: start the gateway with \
                      this config once, which updates it"
                .into(),
            // SQLite's "no such table", PostgreSQL's undefined_table.
            Err(sqlx::Error::Database(e))
                if e.message().contains("no such table")
                    || e.code().as_deref() == Some("42P01") =>
            {
                "the ledger holds no switchyard table: is state.ledger the gateway's?".into()
            }
            // SQLITE_READONLY_DIRECTORY: the file may be read, but its `-shm` file is missing
            // and cannot be made (a reader of a WAL database needs one).
            Err(sqlx::Error::Database(e)) if e.code().as_deref() == Some("1544") => {
                "cannot read the SQLite ledger: SQLite needs its shared-memory file (the \
                 ledger's name with -shm) beside it, which exists while the gateway runs; \
                 this user may not make it in that folder"
                    .into()
            }
            Err(e) => format!("cannot read the ledger: {e}"),
        };
        store.close().await;
        Err(refused)
    }

    /// Writes `batch` in one transaction and empties it; on failure the rows stay in it.
    pub async fn write(&self, batch: &mut Vec<LedgerRow>) -> Result<(), WriteError> {
        self.write_as(batch, &BatchId::new()).await
    }

    /// `write`, under `id`: PostgreSQL takes a batch id once, so a batch written again after
    /// a failure that may have been committed all the same is not written twice. (SQLite,
    /// in process, knows whether it committed.)
    async fn write_as(&self, batch: &mut Vec<LedgerRow>, id: &BatchId) -> Result<(), WriteError> {
        match self {
            Store::Sqlite(_, None) => return Err(WriteError::ReadOnly),
            Store::Sqlite(_, Some(writer)) => {
                let (rows, written) = writer.write(std::mem::take(batch)).await;
                *batch = rows;
                written?;
            }
            Store::Postgres(pool) => {
                if insert_postgres(pool, batch, id).await? == Written::Before {
                    tracing::warn!(
                        rows = batch.len(),
                        "ledger batch written again after a failure had been committed already; not written twice"
                    );
                }
            }
        }
        batch.clear();
        Ok(())
    }

    /// Forgets batch ids older than `BATCH_ID_KEPT_MS` (PostgreSQL).
    async fn prune_batch_ids(&self) {
        if let Store::Postgres(pool) = self {
            let before = BatchId::at(crate::ledger::now_ms() - BATCH_ID_KEPT_MS);
            if let Err(e) = sqlx::query("DELETE FROM ledger_batches WHERE id < $1")
                .bind(&before.0)
                .execute(pool)
                .await
            {
                tracing::warn!(error = %e, "cannot forget old ledger batch ids; tried again in an hour");
            }
        }
    }

    /// What a scope spent since `since_ms` (cache hits cost nothing, so they add nothing).
    pub async fn spent_since(&self, scope: Scope<'_>, since_ms: i64) -> Result<f64, sqlx::Error> {
        let (filter, value) = match scope {
            Scope::Global => ("", None),
            Scope::Key(k) => (" AND key_name = ", Some(k)),
            Scope::Team(t) => (" AND team = ", Some(t)),
        };
        macro_rules! sum {
            ($pool:expr, $p1:expr, $p2:expr) => {{
                let sql = match value {
                    None => format!("SELECT CAST(COALESCE(SUM(cost_usd), 0) AS DOUBLE PRECISION) FROM requests WHERE ts_ms >= {}", $p1),
                    Some(_) => format!("SELECT CAST(COALESCE(SUM(cost_usd), 0) AS DOUBLE PRECISION) FROM requests WHERE ts_ms >= {}{filter}{}", $p1, $p2),
                };
                let mut q = sqlx::query(&sql).bind(since_ms);
                if let Some(v) = value {
                    q = q.bind(v);
                }
                let row = q.fetch_one($pool).await?;
                Ok(row.try_get::<f64, _>(0).unwrap_or(0.0))
            }};
        }
        match self {
            Store::Sqlite(pool, _) => sum!(pool, "?", "?"),
            Store::Postgres(pool) => sum!(pool, "$1", "$2"),
        }
    }

    /// A spend report: rows with `since_ms <= ts < until_ms`, grouped, costliest first.
    pub async fn report(
        &self,
        by: GroupBy,
        since_ms: i64,
        until_ms: i64,
    ) -> Result<Vec<SpendLine>, sqlx::Error> {
        let col = by.column();
        let select = |p1: &str, p2: &str| {
            format!(
                "SELECT {col}, COUNT(*), CAST(SUM(prompt_tokens) AS BIGINT), CAST(SUM(cached_tokens) AS BIGINT), \
                 CAST(SUM(completion_tokens) AS BIGINT), CAST(SUM(cost_usd) AS DOUBLE PRECISION), \
                 CAST(SUM(CASE WHEN cache_hit THEN 1 ELSE 0 END) AS BIGINT) \
                 FROM requests WHERE ts_ms >= {p1} AND ts_ms < {p2} GROUP BY {col} ORDER BY 6 DESC, 1"
            )
        };
        let rows = match self {
            Store::Sqlite(pool, _) => sqlx::query(&select("?", "?"))
                .bind(since_ms)
                .bind(until_ms)
                .fetch_all(pool)
                .await?
                .into_iter()
                .map(|r| line(&r))
                .collect::<Result<Vec<_>, _>>()?,
            Store::Postgres(pool) => sqlx::query(&select("$1", "$2"))
                .bind(since_ms)
                .bind(until_ms)
                .fetch_all(pool)
                .await?
                .into_iter()
                .map(|r| line(&r))
                .collect::<Result<Vec<_>, _>>()?,
        };
        Ok(rows)
    }

    /// Every row, oldest first (for tests and exports).
    pub async fn rows(&self) -> Result<Vec<LedgerRow>, sqlx::Error> {
        const SQL: &str = "SELECT ts_ms, request_id, key_name, team, client_user, route, deployment, provider, endpoint, status, prompt_tokens, cached_tokens, completion_tokens, cost_usd, latency_ms, ttft_ms, cache_hit, estimated FROM requests ORDER BY id";
        macro_rules! all {
            ($pool:expr) => {{
                let rows = sqlx::query(SQL).fetch_all($pool).await?;
                rows.iter()
                    .map(|r| {
                        Ok(LedgerRow {
                            ts_ms: r.try_get(0)?,
                            request_id: r.try_get(1)?,
                            key: r.try_get::<String, _>(2)?.into(),
                            team: r.try_get::<String, _>(3)?.into(),
                            user: r.try_get(4)?,
                            route: r.try_get::<String, _>(5)?.into(),
                            deployment: r.try_get::<String, _>(6)?.into(),
                            provider: r.try_get::<String, _>(7)?.into(),
                            endpoint: r.try_get::<String, _>(8)?.into(),
                            status: r.try_get::<i32, _>(9)? as u16,
                            prompt_tokens: r.try_get::<i64, _>(10)? as u64,
                            cached_tokens: r.try_get::<i64, _>(11)? as u64,
                            completion_tokens: r.try_get::<i64, _>(12)? as u64,
                            cost_usd: r.try_get(13)?,
                            latency_ms: r.try_get(14)?,
                            ttft_ms: r.try_get(15)?,
                            cache_hit: r.try_get(16)?,
                            estimated: r.try_get(17)?,
                        })
                    })
                    .collect()
            }};
        }
        match self {
            Store::Sqlite(pool, _) => all!(pool),
            Store::Postgres(pool) => all!(pool),
        }
    }

    pub async fn close(&self) {
        match self {
            Store::Sqlite(p, w) => {
                if let Some(w) = w {
                    w.close().await;
                }
                p.close().await;
            }
            Store::Postgres(p) => p.close().await,
        }
    }
}

/// A batch's id: the time it was first written (hex, so that ids sort by it) and a random
/// part.
#[derive(Debug, Clone, PartialEq, Eq)]
struct BatchId(String);

impl BatchId {
    fn new() -> BatchId {
        BatchId(format!(
            "{:012x}{:032x}",
            crate::ledger::now_ms().max(0),
            rand::random::<u128>()
        ))
    }

    /// Sorts before every id made at `ms` or later.
    fn at(ms: i64) -> BatchId {
        BatchId(format!("{:012x}", ms.max(0)))
    }
}

#[derive(Debug, PartialEq, Eq)]
enum Written {
    Now,
    /// Its id was there: committed by an earlier try.
    Before,
}

/// One multi-row INSERT per chunk (`statement_chunks`): few round-trips to the database,
/// and few statement shapes (`insert_sql`, one text per power of two), each parsed once and
/// kept in sqlx's statement cache. The arguments are sized up front. The batch's id goes
/// first: taken already, the batch was committed before (the transaction is rolled back).
async fn insert_postgres(
    pool: &PgPool,
    rows: &[LedgerRow],
    id: &BatchId,
) -> Result<Written, sqlx::Error> {
    use sqlx::Arguments;
    static SQL: LazyLock<Vec<String>> = LazyLock::new(|| insert_sql(true));
    let enc = sqlx::Error::Encode;
    let mut tx = pool.begin().await?;
    let taken = sqlx::query("INSERT INTO ledger_batches (id) VALUES ($1)")
        .bind(&id.0)
        .execute(&mut *tx)
        .await;
    match taken {
        Err(sqlx::Error::Database(e)) if e.is_unique_violation() => return Ok(Written::Before),
        taken => taken?,
    };
    for chunk in statement_chunks(rows, MAX_ROWS_PER_STATEMENT) {
        let mut args = sqlx::postgres::PgArguments::default();
        args.reserve(chunk.len() * COLUMNS, chunk.len() * 160);
        for r in chunk {
            for v in r.values() {
                match v {
                    Value::Int(n) => args.add(n),
                    Value::Status(n) => args.add(n),
                    Value::Text(t) => args.add(t),
                    Value::Real(x) => args.add(x),
                    Value::MaybeReal(x) => args.add(x),
                    Value::Flag(b) => args.add(b),
                }
                .map_err(enc)?;
            }
        }
        sqlx::query_with(&SQL[chunk.len().trailing_zeros() as usize], args)
            .execute(&mut *tx)
            .await?;
    }
    tx.commit().await?;
    Ok(Written::Now)
}

/// Whether a `sqlite:` URL names a database in memory (its rows would be lost at exit, and
/// the writer's own connection would not see the pool's).
pub fn in_memory_sqlite(url: &str) -> bool {
    url.starts_with("sqlite:") && (url.contains(":memory:") || url.contains("mode=memory"))
}

/// Whether a ledger URL names a PostgreSQL database (anything else is SQLite).
pub fn is_postgres(url: &str) -> bool {
    url.starts_with("postgres://") || url.starts_with("postgresql://")
}

fn migration_failed(e: sqlx::Error) -> String {
    format!("ledger migration failed: {e}")
}

/// How many migrations the ledger has had; an error when it has no `ledger_schema` table.
async fn schema_version<DB>(pool: &sqlx::Pool<DB>) -> Result<i64, sqlx::Error>
where
    DB: sqlx::Database,
    for<'a> &'a sqlx::Pool<DB>: sqlx::Executor<'a, Database = DB>,
    for<'a> <DB as sqlx::Database>::Arguments<'a>: sqlx::IntoArguments<'a, DB>,
    i64: for<'a> sqlx::Decode<'a, DB> + sqlx::Type<DB>,
    usize: sqlx::ColumnIndex<DB::Row>,
{
    sqlx::query("SELECT COUNT(*) FROM ledger_schema")
        .fetch_one(pool)
        .await?
        .try_get(0)
}

async fn migrate_sqlite(pool: &SqlitePool) -> Result<(), sqlx::Error> {
    sqlx::raw_sql("CREATE TABLE IF NOT EXISTS ledger_schema (version INTEGER NOT NULL)")
        .execute(pool)
        .await?;
    let done = schema_version(pool).await?;
    for (i, m) in SQLITE_MIGRATIONS.iter().enumerate().skip(done as usize) {
        let mut tx = pool.begin().await?;
        sqlx::raw_sql(m).execute(&mut *tx).await?;
        sqlx::query("INSERT INTO ledger_schema (version) VALUES (?)")
            .bind(i as i64 + 1)
            .execute(&mut *tx)
            .await?;
        tx.commit().await?;
    }
    Ok(())
}

async fn migrate_postgres(pool: &PgPool) -> Result<(), sqlx::Error> {
    let mut tx = pool.begin().await?;
    // Replicas start together: one migrates, the others wait on the lock.
    sqlx::query("SELECT pg_advisory_xact_lock(7316541)")
        .execute(&mut *tx)
        .await?;
    sqlx::raw_sql("CREATE TABLE IF NOT EXISTS ledger_schema (version INTEGER NOT NULL)")
        .execute(&mut *tx)
        .await?;
    let done: i64 = sqlx::query("SELECT COUNT(*) FROM ledger_schema")
        .fetch_one(&mut *tx)
        .await?
        .get(0);
    for (i, m) in POSTGRES_MIGRATIONS.iter().enumerate().skip(done as usize) {
        sqlx::raw_sql(m).execute(&mut *tx).await?;
        sqlx::query("INSERT INTO ledger_schema (version) VALUES ($1)")
            .bind(i as i32 + 1)
            .execute(&mut *tx)
            .await?;
    }
    tx.commit().await?;
    Ok(())
}

fn line<R: Row>(r: &R) -> Result<SpendLine, sqlx::Error>
where
    usize: sqlx::ColumnIndex<R>,
    for<'a> String: sqlx::Decode<'a, R::Database> + sqlx::Type<R::Database>,
    for<'a> i64: sqlx::Decode<'a, R::Database> + sqlx::Type<R::Database>,
    for<'a> f64: sqlx::Decode<'a, R::Database> + sqlx::Type<R::Database>,
{
    Ok(SpendLine {
        name: r.try_get(0)?,
        requests: r.try_get(1)?,
        prompt_tokens: r.try_get::<Option<i64>, _>(2)?.unwrap_or(0),
        cached_tokens: r.try_get::<Option<i64>, _>(3)?.unwrap_or(0),
        completion_tokens: r.try_get::<Option<i64>, _>(4)?.unwrap_or(0),
        cost_usd: r.try_get::<Option<f64>, _>(5)?.unwrap_or(0.0),
        cache_hits: r.try_get::<Option<i64>, _>(6)?.unwrap_or(0),
    })
}

const BUSY_TIMEOUT: Duration = Duration::from_secs(10);

/// The SQLite ledger's writes: a connection of their own, on a thread of their own (at the
/// same lowered priority as sqlx's). A batch is moved to the thread and back, and each row's
/// values are bound where they lie (through sqlx every text value was copied once more to
/// cross to its worker thread, in arguments made and freed per statement: 10 allocations
/// and ~4k instructions per row more, `bench/allocations.sh`, `bench/instructions.sh`).
#[derive(Clone)]
pub struct SqliteWriter {
    jobs: std::sync::mpsc::Sender<Job>,
}

enum Job {
    /// Rows to write, where the thread reports each statement done (`Step::Paused`) and
    /// the rows at the end, and where it waits to be told to go on after each statement.
    Write(
        Vec<LedgerRow>,
        mpsc::Sender<Step>,
        std::sync::mpsc::Receiver<()>,
    ),
    Close(oneshot::Sender<()>),
}

enum Step {
    Paused,
    Finished(Vec<LedgerRow>, rusqlite::Result<()>),
}

impl SqliteWriter {
    /// Opens the (migrated) database file for writing on a new thread.
    async fn open(path: std::path::PathBuf) -> Result<SqliteWriter, String> {
        let (jobs, queue) = std::sync::mpsc::channel::<Job>();
        let (opened, open_result) = oneshot::channel();
        std::thread::Builder::new()
            .name("switchyard-ledger".into())
            .spawn(move || {
                let conn = open_for_writing(&path);
                let _ = opened.send(conn.as_ref().map(|_| ()).map_err(|e| e.to_string()));
                let Ok(mut conn) = conn else {
                    return;
                };
                // Declared after the connection, so dropped (finalized) before it.
                let mut inserts = Inserts::default();
                #[cfg(target_os = "linux")]
                let _ = rustix::process::setpriority_process(None, SQLITE_NICE);
                for job in queue {
                    match job {
                        Job::Write(rows, steps, go) => {
                            let written = insert_sqlite(&mut conn, &mut inserts, &rows, || {
                                // Gone (the process is stopping): the rest is written at once.
                                if steps.blocking_send(Step::Paused).is_ok() {
                                    let _ = go.recv();
                                }
                            });
                            let _ = steps.blocking_send(Step::Finished(rows, written));
                        }
                        Job::Close(done) => {
                            // Its statements first: SQLite closes no connection with a
                            // statement not finalized.
                            drop(inserts);
                            drop(conn);
                            let _ = done.send(());
                            return;
                        }
                    }
                }
            })
            .map_err(|e| e.to_string())?;
        match open_result.await {
            Ok(opened) => opened.map(|()| SqliteWriter { jobs }),
            Err(_) => Err("its thread stopped".to_string()),
        }
    }

    /// Writes `rows` on the writer's thread and hands them back (to be kept when they were
    /// not written). Between two statements the thread waits until this task, polled by the
    /// runtime in its turn, tells it to go on: the writer takes the CPU in short turns, as
    /// the requests do, and never for longer than a statement (see
    /// `SQLITE_ROWS_PER_STATEMENT`).
    async fn write(&self, rows: Vec<LedgerRow>) -> (Vec<LedgerRow>, Result<(), WriteError>) {
        let (steps_tx, mut steps) = mpsc::channel(1);
        let (go, go_rx) = std::sync::mpsc::channel();
        if let Err(std::sync::mpsc::SendError(job)) =
            self.jobs.send(Job::Write(rows, steps_tx, go_rx))
        {
            let Job::Write(rows, ..) = job else {
                unreachable!()
            };
            return (rows, Err(WriteError::WriterGone));
        }
        loop {
            match steps.recv().await {
                Some(Step::Paused) => {
                    let _ = go.send(());
                }
                Some(Step::Finished(rows, written)) => {
                    return (rows, written.map_err(WriteError::from))
                }
                // The thread died writing them (a panic): they are lost with it.
                None => return (Vec::new(), Err(WriteError::WriterGone)),
            }
        }
    }

    async fn close(&self) {
        let (done, closed) = oneshot::channel();
        if self.jobs.send(Job::Close(done)).is_ok() {
            let _ = closed.await;
        }
    }
}

fn open_for_writing(path: &std::path::Path) -> rusqlite::Result<rusqlite::Connection> {
    use rusqlite::OpenFlags;
    let conn = rusqlite::Connection::open_with_flags(
        path,
        OpenFlags::SQLITE_OPEN_READ_WRITE | OpenFlags::SQLITE_OPEN_NO_MUTEX,
    )?;
    conn.busy_timeout(BUSY_TIMEOUT)?;
    // As the pool's connections (see `Store::open`); the journal mode is the file's.
    conn.pragma_update(None, "synchronous", "NORMAL")?;
    // Appending rows touches the right edges of the table and its indexes, and the pages of
    // the keys and teams in the batch: 512 KiB of page cache (SQLite's default is 2 MiB, in
    // the writer thread's own heap) keeps those; any other page is in the OS's cache.
    conn.pragma_update(None, "cache_size", -512)?;
    Ok(conn)
}

/// Rows per SQLite INSERT at most. The writer's thread shares the CPU with the requests, and
/// a running thread is not preempted by one that wakes until it has had its time slice
/// (Linux's EEVDF scheduler runs the current task to parity, ~3 ms): a whole batch written
/// in one go held a request's wake-up for milliseconds (c1 p99 350-430 -> 450-880 µs, `wrk
/// -c1`); yielding after each statement instead starved the writer under saturation (rows
/// queued: 80 MiB peak RSS at c64). So the writer waits between statements for the ledger's
/// task to be polled (`SqliteWriter::write`): 32 rows take ~0.2 ms.
const SQLITE_ROWS_PER_STATEMENT: usize = 32;

/// One transaction per batch, one multi-row INSERT per chunk (`statement_chunks`): few
/// statement shapes (`insert_sql`, one per power of two), each prepared once and kept
/// (`Inserts`). `pause` is called after each statement (see `SQLITE_ROWS_PER_STATEMENT`).
fn insert_sqlite(
    conn: &mut rusqlite::Connection,
    inserts: &mut Inserts,
    rows: &[LedgerRow],
    mut pause: impl FnMut(),
) -> rusqlite::Result<()> {
    let tx = conn.transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)?;
    for chunk in statement_chunks(rows, SQLITE_ROWS_PER_STATEMENT) {
        inserts.insert(&tx, chunk)?;
        pause();
    }
    tx.commit()
}

/// The writer's INSERT statements, one per chunk size (`insert_sql`), each prepared on its
/// first use and kept until the writer closes. They are bound and run through SQLite's C
/// API, not rusqlite's: rusqlite binds every text as `SQLITE_TRANSIENT` (SQLite copies it
/// into memory of its own and frees it when the statement is cleared), where here the nine
/// text values of a row are bound where they lie (`SQLITE_STATIC`) for as long as one
/// statement runs, and nothing is cleared after it: 4.5k instructions (of ~97k) and 4.7
/// allocations fewer per bare request (`bench/instructions.sh`, `bench/allocations.sh`).
struct Inserts([*mut rusqlite::ffi::sqlite3_stmt; INSERT_SHAPES]);

/// The statements `Inserts` keeps: 1, 2, 4 … `SQLITE_ROWS_PER_STATEMENT` rows.
const INSERT_SHAPES: usize = SQLITE_ROWS_PER_STATEMENT.trailing_zeros() as usize + 1;

impl Default for Inserts {
    fn default() -> Self {
        Inserts([std::ptr::null_mut(); INSERT_SHAPES])
    }
}

impl Inserts {
    /// Inserts `rows` (a power of two of them, at most `SQLITE_ROWS_PER_STATEMENT`) with one
    /// statement on `conn`, the connection every statement of this `Inserts` belongs to.
    fn insert(&mut self, conn: &rusqlite::Connection, rows: &[LedgerRow]) -> rusqlite::Result<()> {
        use rusqlite::ffi;
        use std::os::raw::c_int;
        static SQL: LazyLock<Vec<String>> = LazyLock::new(|| insert_sql(false));
        debug_assert!(rows.len().is_power_of_two() && rows.len() <= SQLITE_ROWS_PER_STATEMENT);
        let shape = rows.len().trailing_zeros() as usize;
        // SAFETY: the connection is open for as long as it is borrowed; its handle is used
        // on this thread only (the writer's connection is never shared).
        let db = unsafe { conn.handle() };
        let failed = |rc: c_int| {
            // SAFETY: `db` is open; the message is copied before anything else runs on it.
            let message = unsafe { std::ffi::CStr::from_ptr(ffi::sqlite3_errmsg(db)) };
            rusqlite::Error::SqliteFailure(
                ffi::Error::new(rc),
                Some(message.to_string_lossy().into_owned()),
            )
        };
        if self.0[shape].is_null() {
            let sql = &SQL[shape];
            let mut st = std::ptr::null_mut();
            // SAFETY: `sql` is valid for the length given (its text is not NUL-terminated,
            // which SQLite allows when told the length); `st` receives the statement.
            let rc = unsafe {
                ffi::sqlite3_prepare_v3(
                    db,
                    sql.as_ptr().cast(),
                    c_int::try_from(sql.len()).map_err(|_| rusqlite::Error::InvalidQuery)?,
                    ffi::SQLITE_PREPARE_PERSISTENT,
                    &mut st,
                    std::ptr::null_mut(),
                )
            };
            if rc != ffi::SQLITE_OK {
                return Err(failed(rc));
            }
            self.0[shape] = st;
        }
        let st = self.0[shape];
        // Every parameter is bound again before each run, so none still points at the
        // texts of rows written before (a `SQLITE_STATIC` text must outlive the run only:
        // SQLite copies the values into the rows it writes).
        for (i, v) in rows.iter().flat_map(LedgerRow::values).enumerate() {
            let at = c_int::try_from(i + 1).map_err(|_| rusqlite::Error::InvalidQuery)?;
            // SAFETY: `st` is a live statement of `db`; each text lives in `rows`, borrowed
            // until this function returns, after the statement has run and been reset. Between
            // runs the bindings point at texts gone: sound because SQLite reads them only when
            // the statement runs, every run binds every parameter first, and nothing here
            // expands the statement's SQL (`sqlite3_expanded_sql`, trace hooks).
            let rc = unsafe {
                match v {
                    Value::Int(n) => ffi::sqlite3_bind_int64(st, at, n),
                    Value::Status(n) => ffi::sqlite3_bind_int(st, at, n),
                    Value::Text(t) => ffi::sqlite3_bind_text(
                        st,
                        at,
                        t.as_ptr().cast(),
                        c_int::try_from(t.len()).map_err(|_| rusqlite::Error::InvalidQuery)?,
                        ffi::SQLITE_STATIC(),
                    ),
                    Value::Real(x) | Value::MaybeReal(Some(x)) => {
                        ffi::sqlite3_bind_double(st, at, x)
                    }
                    Value::MaybeReal(None) => ffi::sqlite3_bind_null(st, at),
                    Value::Flag(b) => ffi::sqlite3_bind_int(st, at, c_int::from(b)),
                }
            };
            if rc != ffi::SQLITE_OK {
                return Err(failed(rc));
            }
        }
        // SAFETY: as above; the reset ends the run whatever its outcome, so the statement
        // holds no lock and can run again.
        let rc = unsafe { ffi::sqlite3_step(st) };
        let result = if rc == ffi::SQLITE_DONE {
            Ok(())
        } else {
            Err(failed(rc))
        };
        // SAFETY: as above.
        unsafe { ffi::sqlite3_reset(st) };
        result
    }
}

impl Drop for Inserts {
    fn drop(&mut self) {
        for st in self.0 {
            // SAFETY: each statement was prepared on the writer's connection, which is
            // still open (`Inserts` is dropped first); finalizing a null one is a no-op.
            unsafe { rusqlite::ffi::sqlite3_finalize(st) };
        }
    }
}

/// Every row of a request that ended at or before this time (ms since the epoch) is written:
/// the start of the writer's last round that wrote all it had taken. A budget seeded from
/// the ledger holds the rows up to it (`ledger_read_ms`).
static WRITTEN_THROUGH: std::sync::atomic::AtomicI64 = std::sync::atomic::AtomicI64::new(0);

/// When a ledger read made now holds every row of: now, or earlier while this process's
/// writer has rows not yet written.
pub fn ledger_read_ms() -> i64 {
    crate::ledger::now_ms().min(WRITTEN_THROUGH.load(std::sync::atomic::Ordering::Acquire))
}

/// The handle the request path writes to: a channel to the writer task.
#[derive(Clone)]
pub struct LedgerWriter {
    tx: mpsc::UnboundedSender<LedgerRow>,
    /// Asks the writer to write what is queued now, and to say when it is done.
    flushes: mpsc::UnboundedSender<tokio::sync::oneshot::Sender<()>>,
    /// Rows sent so far; every `BATCH`-th wakes the writer through `full`.
    sent: Arc<AtomicUsize>,
    full: Arc<tokio::sync::Notify>,
}

/// How often queued rows are written (sooner when `BATCH` rows are waiting); after a crash
/// at most this much is missing.
pub const FLUSH_INTERVAL: Duration = Duration::from_millis(250);
const BATCH: usize = 512;

/// The writer task; `shutdown` writes what is queued and stops it.
pub struct LedgerTask {
    stop: Arc<tokio::sync::Notify>,
    /// Ends with the number of rows it could not write.
    task: tokio::task::JoinHandle<usize>,
}

impl LedgerTask {
    /// Whether every queued row was written within `timeout`.
    pub async fn shutdown(self, timeout: Duration) -> bool {
        self.stop.notify_one();
        match tokio::time::timeout(timeout, self.task).await {
            Ok(Ok(0)) => true,
            Ok(Ok(rows)) => {
                tracing::error!(rows, "the ledger could not write these rows; they are lost");
                false
            }
            Ok(Err(_)) => {
                tracing::error!("the ledger's writer failed");
                false
            }
            Err(_) => {
                tracing::error!("the ledger did not finish writing in time");
                false
            }
        }
    }
}

/// Rows per INSERT statement at most (a power of two: 128 rows are 2,304 values, well under
/// SQLite's and PostgreSQL's limits on a statement's parameters).
const MAX_ROWS_PER_STATEMENT: usize = 128;
/// Values per ledger row (`LedgerRow::values`).
const COLUMNS: usize = 18;

/// One value of a ledger row, as both databases' INSERTs bind it.
enum Value<'a> {
    Int(i64),
    /// PostgreSQL's `status` column is an INTEGER (4 bytes).
    Status(i32),
    Text(&'a str),
    Real(f64),
    MaybeReal(Option<f64>),
    Flag(bool),
}

impl LedgerRow {
    /// The row's values in the order `insert_sql` names the columns.
    fn values(&self) -> [Value<'_>; COLUMNS] {
        use Value::*;
        [
            Int(self.ts_ms),
            Text(&self.request_id),
            Text(&self.key),
            Text(&self.team),
            Text(&self.user),
            Text(&self.route),
            Text(&self.deployment),
            Text(&self.provider),
            Text(&self.endpoint),
            Status(i32::from(self.status)),
            Int(self.prompt_tokens as i64),
            Int(self.cached_tokens as i64),
            Int(self.completion_tokens as i64),
            Real(self.cost_usd),
            Real(self.latency_ms),
            MaybeReal(self.ttft_ms),
            Flag(self.cache_hit),
            Flag(self.estimated),
        ]
    }
}

/// `rows` cut into the chunks that `insert_sql` has statements for: full chunks of `max` (a
/// power of two, at most `MAX_ROWS_PER_STATEMENT`), then the rest by the powers of two it is
/// made of.
fn statement_chunks<T>(rows: &[T], max: usize) -> impl Iterator<Item = &[T]> {
    debug_assert!(max.is_power_of_two() && max <= MAX_ROWS_PER_STATEMENT);
    let mut rest = rows;
    std::iter::from_fn(move || {
        if rest.is_empty() {
            return None;
        }
        let take = if rest.len() >= max {
            max
        } else {
            1 << (usize::BITS - 1 - rest.len().leading_zeros())
        };
        let (chunk, tail) = rest.split_at(take);
        rest = tail;
        Some(chunk)
    })
}

/// The INSERT for 2^k rows (index k, up to `MAX_ROWS_PER_STATEMENT` rows), with `?`
/// placeholders for SQLite or `$n` for PostgreSQL.
fn insert_sql(postgres: bool) -> Vec<String> {
    use std::fmt::Write;
    let mut all = Vec::new();
    let mut rows = 1;
    while rows <= MAX_ROWS_PER_STATEMENT {
        // SQLite: `OR FAIL`, so a multi-row INSERT inside the batch's transaction needs no
        // statement journal (with the default `ABORT` SQLite keeps one per statement, in
        // temporary files: 2-3 pwrite calls per ledger row, more than the WAL itself). A
        // failing statement fails the batch either way: its transaction is rolled back.
        let mut sql = String::from(if postgres {
            "INSERT INTO "
        } else {
            "INSERT OR FAIL INTO "
        });
        sql.push_str(
            "requests (ts_ms, request_id, key_name, team, client_user, route, \
             deployment, provider, endpoint, status, prompt_tokens, cached_tokens, \
             completion_tokens, cost_usd, latency_ms, ttft_ms, cache_hit, estimated) VALUES ",
        );
        for row in 0..rows {
            sql.push_str(if row == 0 { "(" } else { ", (" });
            for col in 0..COLUMNS {
                if col > 0 {
                    sql.push_str(", ");
                }
                if postgres {
                    let _ = write!(sql, "${}", row * COLUMNS + col + 1);
                } else {
                    sql.push('?');
                }
            }
            sql.push(')');
        }
        all.push(sql);
        rows *= 2;
    }
    all
}

impl LedgerWriter {
    /// Starts the writer task: rows are written every `FLUSH_INTERVAL`, or as soon as a
    /// batch's worth is queued (at 20,000 requests a second, 250 ms of rows held ~2 MiB).
    pub fn start(store: Store) -> (LedgerWriter, LedgerTask) {
        LedgerWriter::start_every(store, FLUSH_INTERVAL)
    }

    fn start_every(store: Store, interval: Duration) -> (LedgerWriter, LedgerTask) {
        let (tx, mut rx) = mpsc::unbounded_channel::<LedgerRow>();
        let (flushes, mut flush_rx) = mpsc::unbounded_channel();
        // Nothing queued yet: everything ended so far is written.
        WRITTEN_THROUGH.store(crate::ledger::now_ms(), Ordering::Release);
        let stop = Arc::new(tokio::sync::Notify::new());
        let stopped = stop.clone();
        let full = Arc::new(tokio::sync::Notify::new());
        let batch_full = full.clone();
        let task = tokio::spawn(async move {
            let mut batch = Vec::with_capacity(BATCH);
            let mut unsure = None;
            let mut pruned = tokio::time::Instant::now();
            store.prune_batch_ids().await;
            // Connections whose threads were last lowered (`Store::open` lowers the first).
            // None counted yet: the first flush lowers every connection opened since
            // `Store::open` (the budgets' queries at start can open a second one).
            let mut sqlite_connections = 0;
            let mut tick = tokio::time::interval(interval);
            let mut asked = Vec::new();
            loop {
                let stopping = tokio::select! {
                    _ = stopped.notified() => true,
                    _ = tick.tick() => false,
                    _ = batch_full.notified() => false,
                    Some(done) = flush_rx.recv() => {
                        asked.push(done);
                        false
                    }
                };
                // Rows of requests ended before now are in the channel (a request's row is
                // queued as it ends): all of them are taken below.
                let round = crate::ledger::now_ms() - 1;
                while let Ok(r) = rx.try_recv() {
                    batch.push(r);
                    if batch.len() >= BATCH {
                        write_with_retry(&store, &mut batch, &mut unsure).await;
                    }
                }
                if !batch.is_empty() {
                    write_with_retry(&store, &mut batch, &mut unsure).await;
                }
                if batch.is_empty() {
                    WRITTEN_THROUGH.store(round, Ordering::Release);
                }
                // What was queued when a flush was asked for is written (or kept, the database
                // failing): said so.
                asked
                    .drain(..)
                    .for_each(|done: tokio::sync::oneshot::Sender<()>| {
                        let _ = done.send(());
                    });
                if pruned.elapsed() >= Duration::from_secs(3600) {
                    pruned = tokio::time::Instant::now();
                    store.prune_batch_ids().await;
                }
                // A connection opened since (by the pool, a write or a report) brought a new
                // thread: /proc is read only when the pool's connection count changed, and
                // not on every flush (those reads would block the runtime's thread).
                if let Store::Sqlite(pool, _) = &store {
                    if pool.size() != sqlite_connections {
                        sqlite_connections = pool.size();
                        lower_sqlite_threads();
                    }
                }
                if stopping {
                    break;
                }
            }
            store.close().await;
            batch.len()
        });
        let writer = LedgerWriter {
            tx,
            flushes,
            sent: Arc::new(AtomicUsize::new(0)),
            full,
        };
        (writer, LedgerTask { stop, task })
    }

    /// Returns once the rows queued so far have been written (or, the database failing,
    /// tried and kept for later).
    pub async fn flush(&self) {
        let (done, written) = tokio::sync::oneshot::channel();
        if self.flushes.send(done).is_ok() {
            let _ = written.await;
        }
    }

    pub fn record(&self, row: LedgerRow) {
        if self.tx.send(row).is_err() {
            tracing::error!("ledger writer is gone; a row was lost");
            return;
        }
        // One wake-up per batch, not one per row (the writer drains all that is queued).
        if (self.sent.fetch_add(1, Ordering::Relaxed) + 1).is_multiple_of(BATCH) {
            self.full.notify_one();
        }
    }
}

/// The priority of the threads running SQLite (see `lower_sqlite_threads`).
const SQLITE_NICE: i32 = 5;

/// SQLite runs on sqlx's worker threads (one per connection). At the default priority a
/// batch of ledger inserts (or a WAL checkpoint) could hold the CPU for milliseconds while a
/// request waited for it (`perf sched`: runs of up to 3 ms on the request core). Lowered,
/// request work preempts it and the rows still go out (the writer waits for them). On the
/// benchmark's one-core pin, nice 10 halved p99 (c1 611 → 326 µs, c64 13 → 6.3 ms) but let
/// rows queue up under saturation (+8 MiB peak RSS); nice 5 keeps the memory. New
/// connections' threads are found after the flush that sees the pool grow.
fn lower_sqlite_threads() {
    #[cfg(target_os = "linux")]
    {
        let Ok(tasks) = std::fs::read_dir("/proc/self/task") else {
            return;
        };
        for task in tasks.flatten() {
            let is_sqlite = std::fs::read_to_string(task.path().join("comm"))
                .is_ok_and(|c| c.starts_with("sqlx-sqlite"));
            let tid = task
                .file_name()
                .to_str()
                .and_then(|t| t.parse::<i32>().ok())
                .and_then(rustix::process::Pid::from_raw);
            if let (true, Some(tid)) = (is_sqlite, tid) {
                if rustix::process::getpriority_process(Some(tid)).is_ok_and(|p| p < SQLITE_NICE) {
                    let _ = rustix::process::setpriority_process(Some(tid), SQLITE_NICE);
                }
            }
        }
    }
}

/// A failed write (database restarting, disk full) is retried with a pause; rows are kept
/// in memory meanwhile rather than dropped.
async fn write_with_retry(
    store: &Store,
    batch: &mut Vec<LedgerRow>,
    unsure: &mut Option<(BatchId, usize)>,
) {
    let mut wait = Duration::from_millis(100);
    for attempt in 0..8 {
        match write_batch(store, batch, unsure).await {
            Ok(()) => return,
            Err(e) => {
                tracing::error!(error = %e, attempt, rows = batch.len(), "ledger write failed; retrying");
                tokio::time::sleep(wait).await;
                wait = (wait * 2).min(Duration::from_secs(5));
            }
        }
    }
    tracing::error!(
        rows = batch.len(),
        "ledger write kept failing; these rows are kept for the next flush"
    );
}

/// Writes `batch` under a new id. A write that failed may have been committed all the same
/// (PostgreSQL applied the COMMIT and the connection broke before its answer): `unsure`
/// holds its id and how many rows it had (the first of `batch`, which only grows after
/// them), and those go again first, alone, under that id.
async fn write_batch(
    store: &Store,
    batch: &mut Vec<LedgerRow>,
    unsure: &mut Option<(BatchId, usize)>,
) -> Result<(), WriteError> {
    if let Some((id, n)) = unsure.take() {
        if n >= batch.len() {
            let written = store.write_as(batch, &id).await;
            if written.is_err() {
                *unsure = Some((id, n));
            }
            return written;
        }
        let mut first: Vec<LedgerRow> = batch.drain(..n).collect();
        if let Err(e) = store.write_as(&mut first, &id).await {
            first.append(batch);
            *batch = first;
            *unsure = Some((id, n));
            return Err(e);
        }
    }
    if batch.is_empty() {
        return Ok(());
    }
    let id = BatchId::new();
    let n = batch.len();
    let written = store.write_as(batch, &id).await;
    if written.is_err() {
        *unsure = Some((id, n));
    }
    written
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn batches_are_cut_into_statements_of_powers_of_two() {
        let sizes = |n: usize| -> Vec<usize> {
            let rows = vec![0u8; n];
            statement_chunks(&rows, MAX_ROWS_PER_STATEMENT)
                .map(<[u8]>::len)
                .collect()
        };
        assert_eq!(sizes(0), Vec::<usize>::new());
        assert_eq!(sizes(1), [1]);
        assert_eq!(sizes(100), [64, 32, 4]);
        assert_eq!(sizes(512), [128, 128, 128, 128]);
        assert_eq!(sizes(300), [128, 128, 32, 8, 4]);
        let sqlite: Vec<usize> = statement_chunks(&[0u8; 100], SQLITE_ROWS_PER_STATEMENT)
            .map(<[u8]>::len)
            .collect();
        assert_eq!(sqlite, [32, 32, 32, 4]);
        // Every chunk has its statement (at index trailing_zeros), with a value per column.
        let made = insert_sql(false);
        for n in 0..600 {
            let s = sizes(n);
            assert_eq!(s.iter().sum::<usize>(), n);
            for c in s {
                assert!(c.is_power_of_two() && c <= MAX_ROWS_PER_STATEMENT);
                let sql = &made[c.trailing_zeros() as usize];
                assert_eq!(sql.matches('?').count(), c * COLUMNS);
            }
        }
    }

    #[tokio::test]
    async fn a_full_batch_is_written_without_waiting_for_the_interval() {
        let dir = tempfile::tempdir().unwrap();
        let url = format!("sqlite://{}", dir.path().join("ledger.db").display());
        let store = Store::open(&url).await.unwrap();
        let reader = Store::open(&url).await.unwrap();
        // An interval no test waits for: only a full batch can get the rows written.
        let (writer, task) = LedgerWriter::start_every(store, Duration::from_secs(3600));
        tokio::time::sleep(Duration::from_millis(50)).await;
        for i in 0..BATCH {
            writer.record(LedgerRow {
                request_id: format!("r{i}"),
                ..Default::default()
            });
        }
        let Store::Sqlite(pool, _) = &reader else {
            unreachable!()
        };
        let mut written = 0i64;
        for _ in 0..200 {
            written = sqlx::query_scalar("SELECT COUNT(*) FROM requests")
                .fetch_one(pool)
                .await
                .unwrap();
            if written == BATCH as i64 {
                break;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        assert_eq!(written, BATCH as i64);
        task.shutdown(Duration::from_secs(10)).await;
    }

    /// A row whose every value differs from the others' (texts of several lengths, some
    /// empty, one not ASCII; `ttft_ms` both ways).
    fn distinct_row(i: usize) -> LedgerRow {
        LedgerRow {
            ts_ms: 1_700_000_000_000 + i as i64,
            request_id: format!("req-{i}-{}", "x".repeat(i % 7)),
            key: format!("key-{}", i % 3).into(),
            team: if i.is_multiple_of(2) {
                "".into()
            } else {
                format!("team-{i}").into()
            },
            user: format!("usér-{i}"),
            route: format!("route-{}", i % 5).into(),
            deployment: format!("dep-{i}").into(),
            provider: format!("prov-{}", i % 4).into(),
            endpoint: if i.is_multiple_of(3) {
                "embeddings".into()
            } else {
                format!("ep/{i}").into()
            },
            status: 200 + (i % 300) as u16,
            prompt_tokens: i as u64 * 3,
            cached_tokens: i as u64,
            completion_tokens: i as u64 * 7,
            cost_usd: i as f64 / 1000.0,
            latency_ms: i as f64 + 0.25,
            ttft_ms: (i % 2 == 1).then(|| i as f64 / 2.0),
            cache_hit: i.is_multiple_of(5),
            estimated: i.is_multiple_of(7),
        }
    }

    #[tokio::test]
    async fn rows_read_back_as_written_across_batches_that_reuse_each_statement() {
        let dir = tempfile::tempdir().unwrap();
        let url = format!("sqlite://{}", dir.path().join("ledger.db").display());
        let store = Store::open(&url).await.unwrap();
        // 37 = 32 + 4 + 1, then 5 = 4 + 1, 64 = 32 + 32, 3 = 2 + 1: each statement shape runs
        // again with other rows bound where the texts of the rows before had been.
        let mut all = Vec::new();
        let mut next = 0;
        for n in [37, 5, 64, 3] {
            let mut batch: Vec<LedgerRow> = (next..next + n).map(distinct_row).collect();
            next += n;
            all.extend(batch.clone());
            store.write(&mut batch).await.unwrap();
            drop(batch);
        }
        store.close().await;
        let reader = Store::open(&url).await.unwrap();
        assert_eq!(reader.rows().await.unwrap(), all);
    }

    #[tokio::test]
    async fn a_failed_insert_keeps_its_rows_and_the_next_write_succeeds() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("ledger.db");
        let url = format!("sqlite://{}", path.display());
        let store = Store::open(&url).await.unwrap();
        let mut first: Vec<LedgerRow> = (0..3).map(distinct_row).collect();
        store.write(&mut first).await.unwrap();
        // Another connection makes the next inserts fail, then lets them through.
        let other = rusqlite::Connection::open(&path).unwrap();
        other
            .execute_batch(
                "CREATE TRIGGER refuse BEFORE INSERT ON requests \
                 BEGIN SELECT RAISE(FAIL, 'refused by a test'); END",
            )
            .unwrap();
        let mut second: Vec<LedgerRow> = (3..8).map(distinct_row).collect();
        let err = store.write(&mut second).await.unwrap_err();
        assert!(err.to_string().contains("refused by a test"), "{err}");
        assert_eq!(
            second.len(),
            5,
            "the rows of a failed write are handed back"
        );
        other.execute_batch("DROP TRIGGER refuse").unwrap();
        store.write(&mut second).await.unwrap();
        store.close().await;
        let reader = Store::open(&url).await.unwrap();
        let expected: Vec<LedgerRow> = (0..8).map(distinct_row).collect();
        assert_eq!(reader.rows().await.unwrap(), expected);
    }

    #[tokio::test]
    async fn rows_wait_out_a_database_locked_by_another_writer_and_none_is_lost() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("ledger.db");
        let url = format!("sqlite://{}", path.display());
        let store = Store::open(&url).await.unwrap();
        // Another process's writer holds the database for a while.
        let other = rusqlite::Connection::open(&path).unwrap();
        other.execute_batch("BEGIN IMMEDIATE").unwrap();
        let (writer, task) = LedgerWriter::start_every(store.clone(), Duration::from_millis(20));
        for i in 0..700 {
            writer.record(LedgerRow {
                request_id: format!("r{i}"),
                key: "k".into(),
                ..Default::default()
            });
        }
        tokio::time::sleep(Duration::from_millis(600)).await;
        let count = |store: Store| async move {
            let Store::Sqlite(pool, _) = &store else {
                unreachable!()
            };
            sqlx::query_scalar::<_, i64>("SELECT COUNT(*) FROM requests")
                .fetch_one(pool)
                .await
                .unwrap()
        };
        assert_eq!(
            count(store.clone()).await,
            0,
            "written through another's lock"
        );
        other.execute_batch("COMMIT").unwrap();
        task.shutdown(Duration::from_secs(20)).await;
        let reader = Store::open(&url).await.unwrap();
        assert_eq!(count(reader.clone()).await, 700);
        let ids: std::collections::HashSet<String> = reader
            .rows()
            .await
            .unwrap()
            .into_iter()
            .map(|r| r.request_id)
            .collect();
        assert_eq!(ids.len(), 700);
    }
}
