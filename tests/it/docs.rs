//! The documentation as a reader follows it: every fenced block of README.md
//! and docs/ is an example the suite runs (this module runs the README's first
//! integration and the guide's role, sign-up and table set-up; the other
//! modules the rest, each by its name), every link and repository path points
//! at something the repository holds, and the README stays a landing page.

use std::collections::BTreeMap;
use std::path::Path;

use sqlx::PgPool;

use crate::common::{self, ForumRole};

const ROOT: &str = env!("CARGO_MANIFEST_DIR");

/// Every fenced block's example name, by file, in order.
fn examples() -> BTreeMap<String, Vec<String>> {
    let mut found = BTreeMap::new();
    for path in common::doc_files() {
        let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{path}: {e}"));
        let mut names = Vec::new();
        let mut in_fence = false;
        let mut previous = "";
        for (n, line) in text.lines().enumerate() {
            if line.trim_start().starts_with("```") {
                if !in_fence {
                    let name = previous
                        .trim()
                        .strip_prefix("<!-- example: ")
                        .and_then(|rest| rest.strip_suffix(" -->"))
                        .unwrap_or_else(|| {
                            panic!(
                                "{path}:{}: a fenced block without `<!-- example: NAME -->` \
                                 on the line before: the suite runs every example",
                                n + 1
                            )
                        });
                    names.push(name.to_owned());
                }
                in_fence = !in_fence;
            }
            if !line.trim().is_empty() {
                previous = line;
            }
        }
        assert!(!in_fence, "{path}: a fence is never closed");
        found.insert(path, names);
    }
    found
}

/// The text of every test source and fixture: where an example's name must
/// appear, quoted, for it to be run.
fn test_sources() -> String {
    let mut all = String::new();
    for dir in ["tests/it", "tests/fixtures"] {
        for entry in std::fs::read_dir(format!("{ROOT}/{dir}"))
            .unwrap_or_else(|e| panic!("{dir}: {e}"))
            .filter_map(|e| e.ok())
        {
            let path = entry.path();
            if path.file_name().and_then(|n| n.to_str()) == Some("docs.rs") {
                continue;
            }
            if let Ok(text) = std::fs::read_to_string(&path) {
                all.push_str(&text);
            }
        }
    }
    all.push_str(include_str!("docs.rs"));
    all
}

#[test]
fn every_block_of_the_docs_is_an_example_the_suite_runs() {
    let sources = test_sources();
    let mut seen = BTreeMap::new();
    for (path, names) in examples() {
        for name in names {
            if let Some(other) = seen.insert(name.clone(), path.clone()) {
                panic!("example {name} is in {other} and {path}: names are unique");
            }
            assert!(
                sources.contains(&format!("\"{name}\"")),
                "{path}: example {name} is run by no test (no test names it)"
            );
        }
    }
    assert!(seen.len() >= 15, "{seen:?}");
}

/// GitHub's anchor of a heading: lower case, punctuation but `-` and `_`
/// dropped, spaces as `-`.
fn anchor(heading: &str) -> String {
    heading
        .trim()
        .to_lowercase()
        .chars()
        .filter(|c| c.is_alphanumeric() || matches!(c, ' ' | '-' | '_'))
        .map(|c| if c == ' ' { '-' } else { c })
        .collect()
}

#[test]
fn every_link_and_repository_path_of_the_docs_exists() {
    let top: Vec<String> = std::fs::read_dir(ROOT)
        .unwrap_or_else(|e| panic!("{e}"))
        .filter_map(|e| e.ok())
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n != "target")
        .collect();
    let mut checked = 0;
    for path in common::doc_files() {
        let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{path}: {e}"));
        let dir = Path::new(&path).parent().unwrap_or(Path::new(ROOT));
        // Markdown links: a file (and a heading in it) of the repository.
        for (_, rest) in text.match_indices("](").map(|(i, _)| text.split_at(i + 2)) {
            let Some(end) = rest.find(')') else { continue };
            let target = &rest[..end];
            if target.starts_with("http") || target.starts_with("mailto:") {
                continue;
            }
            let (file, heading) = target.split_once('#').unwrap_or((target, ""));
            let resolved = if file.is_empty() {
                Path::new(&path).to_path_buf()
            } else {
                dir.join(file)
            };
            assert!(
                resolved.exists(),
                "{path}: links to {target}, which the repository does not hold"
            );
            if !heading.is_empty() {
                let linked = std::fs::read_to_string(&resolved).unwrap_or_else(|e| panic!("{e}"));
                assert!(
                    linked
                        .lines()
                        .filter_map(|l| l.strip_prefix('#'))
                        .any(|h| anchor(h.trim_start_matches('#')) == heading),
                    "{path}: links to {target}: no such heading"
                );
            }
            checked += 1;
        }
        // Paths in backticks (outside fenced blocks) that start at a
        // top-level entry of the repository.
        let mut in_fence = false;
        let prose: String = text
            .lines()
            .filter(|l| {
                if l.trim_start().starts_with("```") {
                    in_fence = !in_fence;
                    return false;
                }
                !in_fence
            })
            .collect::<Vec<_>>()
            .join("\n");
        for span in prose.split('`').skip(1).step_by(2) {
            let span = span.trim_end_matches(['.', ',', ':']);
            let first = span.split('/').next().unwrap_or_default();
            if span.contains('/')
                && !span.contains(' ')
                && !span.contains('*')
                && top.iter().any(|t| t == first)
            {
                assert!(
                    Path::new(ROOT).join(span).exists(),
                    "{path}: names `{span}`, which the repository does not hold"
                );
                checked += 1;
            }
        }
    }
    assert!(checked >= 20, "only {checked} links and paths: the parser");
}

#[test]
fn the_readme_is_a_landing_page() {
    let readme =
        std::fs::read_to_string(format!("{ROOT}/README.md")).unwrap_or_else(|e| panic!("{e}"));
    let lines = readme.lines().count();
    assert!(
        lines <= 150,
        "README.md has {lines} lines: guides go to docs/"
    );
    for guide in [
        "integrating",
        "adopting",
        "operating",
        "scaling",
        "design",
        "benchmarks",
    ] {
        assert!(
            readme.contains(&format!("(docs/{guide}.md)")),
            "README.md does not point at docs/{guide}.md"
        );
    }
}

/// A role made the way the docs say (`example`, with `forum_app` replaced by
/// a name of this test's own), given a password to log in with over TCP.
async fn role_from_docs(pool: &PgPool, example: &str) -> ForumRole {
    let name = ForumRole::unique_name("docs");
    let script = common::doc_example(example).replace("forum_app", &name);
    let owner = common::database_url(pool);
    let (ok, _, err) = common::psql(&owner, &script);
    assert!(ok, "{example} as the owner: {err}");
    let (ok, _, err) = common::psql(&owner, &format!("ALTER ROLE \"{name}\" PASSWORD '{name}'"));
    assert!(ok, "{err}");
    ForumRole {
        password: name.clone(),
        name,
        database: sqlx::query_scalar("SELECT current_database()::TEXT")
            .fetch_one(pool)
            .await
            .unwrap_or_else(|e| panic!("{e}")),
    }
}

#[sqlx::test(migrations = false)]
async fn the_readmes_first_integration_runs_as_written(pool: PgPool) {
    common::migrate(&pool).await;
    let role = role_from_docs(&pool, "quickstart-role").await;
    let (ok, out, err) = role.psql(&common::doc_example("quickstart"));
    assert!(ok, "the quickstart as the forum's role: {err}");
    assert_eq!(
        out.lines().collect::<Vec<_>>(),
        ["5", "1"],
        "the score of the approved topic and the next topic's position"
    );
    let (name, score): (String, i64) =
        sqlx::query_as("SELECT username, loyalty_score FROM users WHERE id = 42")
            .fetch_one(&pool)
            .await
            .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!((name.as_str(), score), ("ada", 5));
    common::scores_exact(&pool, "the README's quickstart").await;
    role.drop_role(&pool).await;
}

#[sqlx::test(migrations = false)]
async fn the_guides_role_signs_users_up_and_owns_nothing_else(pool: PgPool) {
    common::migrate(&pool).await;
    let role = role_from_docs(&pool, "sql-grant").await;
    let (ok, _, err) = role.psql(&common::doc_example("sql-signup"));
    assert!(ok, "sign-up as the forum's role: {err}");
    let users: Vec<(i64, String, bool)> = sqlx::query_as(
        "SELECT id, username, created_at = '2024-05-01'::TIMESTAMPTZ FROM users ORDER BY id",
    )
    .fetch_all(&pool)
    .await
    .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(
        users,
        [
            (42, "ada lovelace".to_owned(), false),
            (43, "bob".to_owned(), true)
        ]
    );
    // The guide's upsert runs again as a rename; the rest of a user is not
    // the forum's to write.
    let (ok, _, err) = role.psql(
        "INSERT INTO users (id, username) VALUES (43, 'bobby')
             ON CONFLICT (id) DO UPDATE SET username = EXCLUDED.username",
    );
    assert!(ok, "{err}");
    for sql in [
        "UPDATE users SET created_at = now() WHERE id = 43",
        "UPDATE users SET id = 44 WHERE id = 43",
        "INSERT INTO users (id, username, loyalty_score) VALUES (45, 'eve', 1000)",
        "DELETE FROM users WHERE id = 43",
    ] {
        let (ok, _, err) = role.psql(sql);
        assert!(!ok && err.contains("permission denied"), "{sql}: {err}");
    }
    // A NULL where an ORM sends one for an attribute it was not given is the
    // column's default, as the guide says.
    let (ok, _, err) = role.psql(
        "INSERT INTO post_moderation_queue (post_id, topic_id, priority_score, entered_queue_at)
             VALUES ('orm-1', 't-1', NULL, NULL), ('orm-2', 't-1', 2, NULL);
         INSERT INTO moderation_events (user_id, event_type, content_type, content_id, outcome, created_at)
             VALUES (43, 'moderation_decision', 'post', 'orm-0', 'approved', NULL);",
    );
    assert!(ok, "explicit NULLs: {err}");
    let queued: Vec<(String, f64, bool)> = sqlx::query_as(
        "SELECT post_id, priority_score, entered_queue_at > now() - INTERVAL '1 minute'
           FROM post_moderation_queue ORDER BY post_id",
    )
    .fetch_all(&pool)
    .await
    .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(
        queued,
        [
            ("orm-1".to_owned(), 0.0, true),
            ("orm-2".to_owned(), 2.0, true)
        ]
    );
    let (ok, out, err) = role.psql(
        "SELECT position FROM queue_position('post', 'orm-1');
         SELECT position FROM queue_position('post', 'orm-2');",
    );
    assert!(ok, "{err}");
    assert_eq!(
        out.lines().collect::<Vec<_>>(),
        ["1", "2"],
        "each at its tail"
    );
    let recent: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM moderation_events WHERE created_at > now() - INTERVAL '1 minute'",
    )
    .fetch_one(&pool)
    .await
    .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(recent, 1);
    assert_eq!(common::score(&pool, 43).await, 1);
    common::scores_exact(&pool, "explicit NULLs").await;
    role.drop_role(&pool).await;
}
