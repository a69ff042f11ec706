//! Compile-time behaviour of `#[saga]` and `#[step]`: what compiles, and the errors (with
//! their spans) for what must not. Regenerate the `.stderr` files with `TRYBUILD=overwrite`
//! after a deliberate change, and review the diff.

#[test]
fn ui() {
    let t = trybuild::TestCases::new();
    t.pass("tests/ui/pass/*.rs");
    t.compile_fail("tests/ui/fail/*.rs");
}
