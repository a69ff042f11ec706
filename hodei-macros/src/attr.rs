//! Parsing and checking: options, and the shape of the annotated function. Every problem is
//! collected in [`Errors`] and reported together.

use std::time::Duration;

use proc_macro2::{Span, TokenStream};
use syn::meta::ParseNestedMeta;
use syn::spanned::Spanned;
use syn::{FnArg, GenericArgument, ItemFn, LitFloat, LitInt, LitStr, Pat, PathArguments, ReturnType, Type};

/// Errors gathered while parsing, so that all of them are reported at once.
#[derive(Default)]
pub struct Errors(Option<syn::Error>);

impl Errors {
    pub fn push(&mut self, error: syn::Error) {
        match &mut self.0 {
            Some(all) => all.combine(error),
            None => self.0 = Some(error),
        }
    }

    pub fn at(&mut self, span: Span, message: impl std::fmt::Display) {
        self.push(syn::Error::new(span, message));
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_none()
    }

    pub fn into_compile_errors(self) -> Option<TokenStream> {
        self.0.map(|e| e.to_compile_error())
    }
}

/// Options shared by both macros.
pub struct Common {
    pub name: Option<LitStr>,
    pub krate: syn::Path,
}

impl Default for Common {
    fn default() -> Self {
        Self { name: None, krate: syn::parse_quote!(::hodei) }
    }
}

impl Common {
    /// Parses `name` and `crate`; returns false for any other option.
    fn parse(&mut self, meta: &ParseNestedMeta<'_>) -> syn::Result<bool> {
        if meta.path.is_ident("name") {
            let name: LitStr = meta.value()?.parse()?;
            if name.value().is_empty() {
                return Err(syn::Error::new(name.span(), "the name must not be empty"));
            }
            self.name = Some(name);
        } else if meta.path.is_ident("crate") {
            let path: LitStr = meta.value()?.parse()?;
            self.krate = path.parse()?;
        } else {
            return Ok(false);
        }
        Ok(true)
    }
}

#[derive(Default)]
pub struct StepOptions {
    pub common: Common,
    pub compensate: Option<syn::Path>,
    pub retry: Option<Retry>,
    pub timeout: Option<Duration>,
}

#[derive(Default)]
pub struct Retry {
    pub max_attempts: Option<u32>,
    pub backoff: Option<Duration>,
    pub max_backoff: Option<Duration>,
    pub multiplier: Option<f64>,
    pub jitter: Option<f64>,
}

#[derive(Default)]
pub struct SagaOptions {
    pub common: Common,
    pub version: Option<u32>,
}

/// Parses a comma-separated option list, reporting each unknown or malformed option and
/// carrying on with the next.
fn parse_options(
    args: TokenStream,
    errors: &mut Errors,
    mut each: impl FnMut(&ParseNestedMeta<'_>) -> syn::Result<()>,
) {
    let parser = syn::meta::parser(|meta| {
        if let Err(e) = each(&meta) {
            errors.push(e);
            // Skip the rest of this option so the next one is still read.
            if meta.input.peek(syn::Token![=]) {
                let _ = meta.value().and_then(|v| v.parse::<syn::Expr>());
            } else if meta.input.peek(syn::token::Paren) {
                let _ = meta.parse_nested_meta(|inner| {
                    if inner.input.peek(syn::Token![=]) {
                        inner.value()?.parse::<syn::Expr>()?;
                    }
                    Ok(())
                });
            }
        }
        Ok(())
    });
    if let Err(e) = syn::parse::Parser::parse2(parser, args) {
        errors.push(e);
    }
}

fn unknown(meta: &ParseNestedMeta<'_>, known: &str) -> syn::Error {
    let path = &meta.path;
    let name = quote::quote!(#path).to_string().replace(' ', "");
    meta.error(format!("unknown option `{name}`; expected one of: {known}"))
}

pub fn step_options(args: TokenStream, errors: &mut Errors) -> StepOptions {
    let mut options = StepOptions::default();
    parse_options(args, errors, |meta| {
        if options.common.parse(meta)? {
        } else if meta.path.is_ident("compensate") {
            options.compensate = Some(meta.value()?.parse()?);
        } else if meta.path.is_ident("timeout") {
            options.timeout = Some(duration(&meta.value()?.parse()?)?);
        } else if meta.path.is_ident("retry") {
            let mut retry = Retry::default();
            let mut problems = Errors::default();
            meta.parse_nested_meta(|inner| {
                if let Err(e) = retry_option(&inner, &mut retry) {
                    problems.push(e);
                    // Skip this option's value so the next one is still read.
                    if inner.input.peek(syn::Token![=]) {
                        inner.value()?.parse::<syn::Expr>()?;
                    }
                }
                Ok(())
            })?;
            if let Some(e) = problems.0 {
                return Err(e);
            }
            options.retry = Some(retry);
        } else {
            return Err(unknown(meta, "name, compensate, retry, timeout, crate"));
        }
        Ok(())
    });
    options
}

fn retry_option(inner: &ParseNestedMeta<'_>, retry: &mut Retry) -> syn::Result<()> {
    if inner.path.is_ident("max_attempts") {
        let n: LitInt = inner.value()?.parse()?;
        let n: u32 = n.base10_parse()?;
        if n == 0 {
            return Err(inner.error("max_attempts counts the first attempt: at least 1"));
        }
        retry.max_attempts = Some(n);
    } else if inner.path.is_ident("backoff") {
        retry.backoff = Some(duration(&inner.value()?.parse()?)?);
    } else if inner.path.is_ident("max_backoff") {
        retry.max_backoff = Some(duration(&inner.value()?.parse()?)?);
    } else if inner.path.is_ident("multiplier") {
        let m: f64 = inner.value()?.parse::<LitFloat>()?.base10_parse()?;
        if !(m >= 1.0 && m.is_finite()) {
            return Err(inner.error("multiplier must be at least 1.0"));
        }
        retry.multiplier = Some(m);
    } else if inner.path.is_ident("jitter") {
        let j: f64 = inner.value()?.parse::<LitFloat>()?.base10_parse()?;
        if !(0.0..=1.0).contains(&j) {
            return Err(inner.error("jitter is a fraction from 0.0 to 1.0"));
        }
        retry.jitter = Some(j);
    } else {
        return Err(unknown(inner, "max_attempts, backoff, max_backoff, multiplier, jitter"));
    }
    Ok(())
}

pub fn saga_options(args: TokenStream, errors: &mut Errors) -> SagaOptions {
    let mut options = SagaOptions::default();
    parse_options(args, errors, |meta| {
        if options.common.parse(meta)? {
        } else if meta.path.is_ident("version") {
            options.version = Some(meta.value()?.parse::<LitInt>()?.base10_parse()?);
        } else {
            return Err(unknown(meta, "name, version, crate"));
        }
        Ok(())
    });
    options
}

/// `"250ms"`, `"30s"`, `"5m"`, `"2h"`, or a combination such as `"1m30s"`.
fn duration(lit: &LitStr) -> syn::Result<Duration> {
    let text = lit.value();
    let bad = || {
        syn::Error::new(
            lit.span(),
            format!("`{text}` is not a duration; write e.g. \"500ms\", \"30s\", \"5m\" or \"1h\""),
        )
    };
    let mut total = Duration::ZERO;
    let mut rest = text.trim();
    if rest.is_empty() {
        return Err(bad());
    }
    while !rest.is_empty() {
        let digits = rest.find(|c: char| !c.is_ascii_digit()).unwrap_or(rest.len());
        let value: u64 = rest[..digits].parse().map_err(|_| bad())?;
        rest = &rest[digits..];
        let unit = rest.find(|c: char| c.is_ascii_digit()).unwrap_or(rest.len());
        let part = match &rest[..unit] {
            "ms" => Duration::from_millis(value),
            "s" => Duration::from_secs(value),
            "m" => Duration::from_secs(value * 60),
            "h" => Duration::from_secs(value * 3600),
            _ => return Err(bad()),
        };
        total += part;
        rest = &rest[unit..];
    }
    Ok(total)
}

/// The parts of an annotated function that the expansion needs.
pub struct Signature {
    /// The context parameter as written (`ctx: StepContext`).
    pub context: Option<syn::PatType>,
    /// The other parameters.
    pub inputs: Vec<syn::PatType>,
    /// `T` of `Result<T, E>`.
    pub output: Option<Type>,
}

/// Checks `async`, the context parameter and the `Result` return type of `item`.
pub fn signature(item: &ItemFn, macro_name: &str, context_type: &str, errors: &mut Errors) -> Signature {
    let sig = &item.sig;
    if sig.asyncness.is_none() {
        errors.at(sig.fn_token.span(), format!("#[{macro_name}] functions must be `async fn`"));
    }
    if !sig.generics.params.is_empty() {
        errors.at(
            sig.generics.span(),
            format!("#[{macro_name}] functions cannot be generic: the journal needs concrete types"),
        );
    }
    let mut args = sig.inputs.iter();
    let context = match args.next() {
        Some(FnArg::Typed(arg)) if last_ident_is(&arg.ty, context_type) => Some(arg.clone()),
        Some(FnArg::Receiver(r)) => {
            errors.at(r.span(), format!("#[{macro_name}] must be a free function, not a method"));
            None
        }
        first => {
            let span = first.map_or_else(|| sig.paren_token.span.join(), |a| a.span());
            errors.at(
                span,
                format!("the first argument of a #[{macro_name}] must be its context: `ctx: {context_type}`"),
            );
            None
        }
    };
    let mut inputs = Vec::new();
    for arg in args {
        match arg {
            FnArg::Typed(arg) => inputs.push(arg.clone()),
            FnArg::Receiver(r) => {
                errors.at(r.span(), format!("#[{macro_name}] must be a free function, not a method"))
            }
        }
    }
    let output = match &sig.output {
        ReturnType::Type(_, ty) => result_ok_type(ty),
        ReturnType::Default => None,
    };
    if output.is_none() {
        let span = match &sig.output {
            ReturnType::Type(_, ty) => ty.span(),
            ReturnType::Default => sig.paren_token.span.join(),
        };
        errors.at(span, format!("a #[{macro_name}] must return `Result<T, E>`"));
    }
    Signature { context, inputs, output }
}

fn last_ident_is(ty: &Type, name: &str) -> bool {
    matches!(ty, Type::Path(p) if p.path.segments.last().is_some_and(|s| s.ident == name))
}

fn result_ok_type(ty: &Type) -> Option<Type> {
    let Type::Path(path) = ty else { return None };
    let last = path.path.segments.last()?;
    if last.ident != "Result" {
        return None;
    }
    let PathArguments::AngleBracketed(args) = &last.arguments else { return None };
    match args.args.first()? {
        GenericArgument::Type(ok) => Some(ok.clone()),
        _ => None,
    }
}

/// A plain identifier for a parameter, to forward it: `x: T` keeps `x`, a pattern gets a
/// fresh name.
pub fn forwarded_name(arg: &syn::PatType, index: usize) -> syn::Ident {
    match &*arg.pat {
        Pat::Ident(p) if p.by_ref.is_none() && p.subpat.is_none() => {
            syn::Ident::new(&format!("__hodei_arg_{}", p.ident), p.ident.span())
        }
        _ => syn::Ident::new(&format!("__hodei_arg_{index}"), arg.span()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn lit(s: &str) -> LitStr {
        LitStr::new(s, Span::call_site())
    }

    #[test]
    fn durations_parse() {
        assert_eq!(duration(&lit("250ms")).unwrap(), Duration::from_millis(250));
        assert_eq!(duration(&lit("30s")).unwrap(), Duration::from_secs(30));
        assert_eq!(duration(&lit("1m30s")).unwrap(), Duration::from_secs(90));
        assert_eq!(duration(&lit("2h")).unwrap(), Duration::from_secs(7200));
        for bad in ["", "10", "s", "1 s", "1d", "-1s"] {
            assert!(duration(&lit(bad)).is_err(), "{bad:?}");
        }
    }
}
