// `sqlx::migrate!` embeds migrations/ at compile time; rebuild when it
// changes (sql/ is embedded with include_str!, which cargo tracks itself).
fn main() {
    println!("cargo:rerun-if-changed=migrations");
}
