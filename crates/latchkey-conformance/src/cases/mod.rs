//! The cases, one module per area. Each case is an `async fn(Cx) ->
//! CaseResult` whose doc comment states what it asserts; the [`cases!`]
//! macro registers it under its `<area>::<behaviour>` name with that doc.

use crate::case::Case;

/// Defines cases and a `cases()` function registering them:
///
/// ```text
/// cases! {
///     /// What it asserts.
///     #[case("kv::name", destructive = true, gate = gates::native_ttl)]
///     async fn name(cx: Cx) -> CaseResult { ... }
/// }
/// ```
macro_rules! cases {
    ($(
        $(#[doc = $doc:literal])+
        #[case($name:literal $(, $k:ident = $v:expr)* $(,)?)]
        async fn $f:ident($cx:ident: Cx) -> CaseResult $body:block
    )+) => {
        $(
            $(#[doc = $doc])+
            async fn $f($cx: Cx) -> CaseResult $body
        )+

        /// Every case of this area, in order.
        pub(crate) fn cases() -> Vec<$crate::case::Case> {
            vec![$(
                $crate::case::Case::new(
                    $name,
                    concat!($($doc, "\n"),+),
                    |cx| -> futures::future::BoxFuture<'static, CaseResult> { Box::pin($f(cx)) },
                )$(.$k($v))*
            ),+]
        }
    };
}

pub(crate) mod fence;
pub(crate) mod input;
pub(crate) mod kv;
pub(crate) mod lock;
pub(crate) mod recipes;
pub(crate) mod ttl;
pub(crate) mod txn;
pub(crate) mod watch;

/// Every case of the suite, area by area.
pub(crate) fn all() -> Vec<Case> {
    let mut v = Vec::new();
    v.extend(kv::cases());
    v.extend(txn::cases());
    v.extend(lock::cases());
    v.extend(fence::cases());
    v.extend(watch::cases());
    v.extend(ttl::cases());
    v.extend(input::cases());
    v.extend(recipes::cases());
    v
}
