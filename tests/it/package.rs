//! The Debian package (scripts/package.sh), installed for real with dpkg on
//! this machine: its files and their modes, its system user, a working
//! binary with the packaged configuration, and a clean removal (`dpkg -r`
//! keeps the configuration, `dpkg -P` purges it).

use std::path::Path;
use std::process::Command;

use sqlx::PgPool;

use crate::common;

fn sh(cmd: &str, args: &[&str]) -> (bool, String) {
    let out = Command::new(cmd)
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("{cmd}: {e}"));
    (
        out.status.success(),
        format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ),
    )
}

fn mode(path: &str) -> u32 {
    use std::os::unix::fs::PermissionsExt;
    std::fs::metadata(path)
        .map(|m| m.permissions().mode() & 0o777)
        .unwrap_or_else(|e| panic!("{path}: {e}"))
}

#[sqlx::test(migrations = false)]
async fn the_debian_package_installs_configures_migrates_and_removes_cleanly(pool: PgPool) {
    // A leftover of an interrupted run goes first: the package, and the
    // database, role and user of the operating guide's steps below.
    let _ = sh("dpkg", &["-P", "loyaltyd"]);
    let (_, passwd) = sh("getent", &["passwd"]);
    for user in passwd.lines().filter_map(|l| l.split(':').next()) {
        if user.starts_with("ly_pkg_") {
            let _ = sh(
                "runuser",
                &["-u", "postgres", "--", "dropdb", "--if-exists", user],
            );
            let _ = sh(
                "runuser",
                &["-u", "postgres", "--", "dropuser", "--if-exists", user],
            );
            let _ = sh("userdel", &[user]);
        }
    }
    let (ok, out) = sh(
        concat!(env!("CARGO_MANIFEST_DIR"), "/scripts/package.sh"),
        &["--fast", env!("CARGO_BIN_EXE_loyaltyd")],
    );
    assert!(ok, "package.sh: {out}");
    let deb = format!("{}/{}", env!("CARGO_MANIFEST_DIR"), out.trim());
    let (ok, out) = sh("dpkg-deb", &["--contents", &deb]);
    assert!(ok, "{out}");
    for file in [
        "./usr/bin/loyaltyd",
        "./lib/systemd/system/loyaltyd.service",
        "./etc/loyaltyd/config.toml",
        "./etc/loyaltyd/loyaltyd.env",
        "./usr/share/loyaltyd/loyaltyd.json",
        "./usr/share/loyaltyd/alerts.yml",
        "./usr/share/doc/loyaltyd/README.md",
        "./usr/share/doc/loyaltyd/integrating.md",
        "./usr/share/doc/loyaltyd/operating.md",
    ] {
        assert!(out.contains(file), "{file} not in the package:\n{out}");
    }

    let (ok, out) = sh("dpkg", &["-i", &deb]);
    assert!(ok, "dpkg -i: {out}");
    assert_eq!(mode("/etc/loyaltyd/loyaltyd.env"), 0o600);
    assert_eq!(mode("/usr/bin/loyaltyd"), 0o755);
    assert!(
        !sh("getent", &["passwd", "loyaltyd"]).0,
        "the unit's user is systemd's dynamic one: the package makes none"
    );
    let (ok, out) = sh("dpkg-query", &["-W", "-f=${Conffiles}", "loyaltyd"]);
    assert!(
        ok && out.contains("/etc/loyaltyd/config.toml")
            && out.contains("/etc/loyaltyd/loyaltyd.env"),
        "{out}"
    );

    // The installed binary with the installed configuration: the local
    // socket and a database `loyaltyd` this machine does not have. check-config
    // and the service itself fail alike, exit 78 with the fix (the unit does
    // not restart on 78).
    for args in [
        &["--config", "/etc/loyaltyd/config.toml", "check-config"][..],
        &["--config", "/etc/loyaltyd/config.toml", "run"][..],
    ] {
        let out = Command::new("/usr/bin/loyaltyd")
            .args(args)
            .env_remove("DATABASE_URL")
            .env(
                "LOYALTYD_METRICS__LISTEN",
                format!("127.0.0.1:{}", common::free_port()),
            )
            .output()
            .unwrap_or_else(|e| panic!("{e}"));
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(78), "{args:?}: {err}");
        assert!(
            err.contains("database \"loyaltyd\" does not exist") && err.contains("createdb"),
            "{args:?}: {err}"
        );
    }
    let url = common::database_url(&pool);
    let (ok, out) = sh(
        "/usr/bin/loyaltyd",
        &[
            "check-config",
            "--offline",
            "--config",
            "/etc/loyaltyd/config.toml",
        ],
    );
    assert!(ok, "check-config --offline: {out}");
    let migrate = Command::new("/usr/bin/loyaltyd")
        .args(["--config", "/etc/loyaltyd/config.toml", "migrate"])
        .env("LOYALTYD_DATABASE__URL", &url)
        .output()
        .unwrap_or_else(|e| panic!("{e}"));
    assert!(
        migrate.status.success(),
        "migrate: {}",
        String::from_utf8_lossy(&migrate.stderr)
    );
    let tables: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM information_schema.tables WHERE table_name = 'moderation_events'",
    )
    .fetch_one(&pool)
    .await
    .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(tables, 1, "migrated by the packaged binary");

    // docs/operating.md's role and database, made as it says (a name of this
    // test's own for `loyaltyd`), and the packaged binary run as that
    // operating-system user, as the unit runs it: the local socket, peer
    // authentication, the tables created at its start.
    let name = format!("ly_pkg_{}", std::process::id());
    let script = common::doc_example("sh-database").replace("loyaltyd", &name);
    let (ok, out) = sh(
        "useradd",
        &[
            "--system",
            "--no-create-home",
            "--shell",
            "/usr/sbin/nologin",
            &name,
        ],
    );
    assert!(ok, "useradd: {out}");
    let (ok, out) = sh("sh", &["-ec", &script]);
    assert!(ok, "{script}: {out}");
    for cmd in [
        &["migrate"][..],
        &["check-config", "--env-file", "/dev/null"],
    ] {
        let out = Command::new("runuser")
            .args(["-u", &name, "--", "/usr/bin/loyaltyd"])
            .args(["--config", "/etc/loyaltyd/config.toml"])
            .args(cmd)
            .env_remove("DATABASE_URL")
            .env(
                "LOYALTYD_DATABASE__URL",
                format!("postgres:///{name}?host=/var/run/postgresql"),
            )
            .output()
            .unwrap_or_else(|e| panic!("{e}"));
        assert!(
            out.status.success(),
            "{cmd:?} as {name}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let (ok, owner, err) = common::psql(
        &format!("host=/var/run/postgresql dbname={name} user=root"),
        "SELECT tableowner FROM pg_tables WHERE tablename = 'moderation_events'",
    );
    assert!(ok, "{err}");
    assert_eq!(owner.trim(), name, "the service's role owns its tables");
    for (cmd, args) in [
        (
            "runuser",
            vec!["-u", "postgres", "--", "dropdb", name.as_str()],
        ),
        (
            "runuser",
            vec!["-u", "postgres", "--", "dropuser", name.as_str()],
        ),
        ("userdel", vec![name.as_str()]),
    ] {
        let (ok, out) = sh(cmd, &args);
        assert!(ok, "{cmd} {args:?}: {out}");
    }

    // An operator's edit survives `dpkg -r`; `dpkg -P` removes it all.
    std::fs::write(
        "/etc/loyaltyd/loyaltyd.env",
        "LOYALTYD_REDIS__URL=redis://127.0.0.1:6379/\n",
    )
    .unwrap_or_else(|e| panic!("{e}"));
    let (ok, out) = sh("dpkg", &["-r", "loyaltyd"]);
    assert!(ok, "dpkg -r: {out}");
    assert!(!Path::new("/usr/bin/loyaltyd").exists());
    assert!(
        Path::new("/etc/loyaltyd/config.toml").exists(),
        "dpkg -r keeps the configuration"
    );
    let (ok, out) = sh("dpkg", &["-P", "loyaltyd"]);
    assert!(ok, "dpkg -P: {out}");
    assert!(!Path::new("/etc/loyaltyd").exists(), "dpkg -P purges it");
}
