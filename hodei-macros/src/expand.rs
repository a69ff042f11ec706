//! Code generation. Everything generated names `<crate>::__private::...` by absolute path, so
//! the expansion never depends on the caller's imports; the user's own types are used as
//! written, in the user's scope.

use proc_macro2::TokenStream;
use quote::{format_ident, quote, quote_spanned};
use syn::spanned::Spanned;
use syn::visit::Visit;
use syn::{Expr, ItemFn, Pat};

use crate::attr::{self, Errors};

fn unparsable(item: TokenStream, error: syn::Error) -> TokenStream {
    let error = error.to_compile_error();
    quote!(#item #error)
}

pub fn step(args: TokenStream, item: TokenStream) -> TokenStream {
    let function: ItemFn = match syn::parse2(item.clone()) {
        Ok(f) => f,
        Err(e) => return unparsable(item, e),
    };
    let mut errors = Errors::default();
    let options = attr::step_options(args, &mut errors);
    let sig = attr::signature(&function, "step", "StepContext", &mut errors);
    let (Some(_), Some(output), true) = (&sig.context, &sig.output, errors.is_empty()) else {
        let errors = errors.into_compile_errors();
        return quote!(#function #errors);
    };

    let Item { p, ident, vis, attrs, name } = Item::new(&function, &options.common);
    let names: Vec<_> = sig.inputs.iter().enumerate().map(|(i, a)| attr::forwarded_name(a, i)).collect();
    let types: Vec<_> = sig.inputs.iter().map(|a| &*a.ty).collect();
    let (input_ty, input_value) = match (names.as_slice(), types.as_slice()) {
        ([], []) => (quote!(()), quote!(())),
        ([n], [t]) => (quote!(#t), quote!(#n)),
        _ => (quote!((#(#types,)*)), quote!((#(#names,)*))),
    };

    let mut body = function.clone();
    body.sig.ident = format_ident!("__hodei_step_body");
    body.vis = syn::Visibility::Inherited;
    body.attrs.retain(|a| !a.path().is_ident("doc"));

    let retry = options.retry.as_ref().map(|r| {
        let mut policy = quote!(#p::RetryPolicy::default());
        if let Some(n) = r.max_attempts {
            policy = quote!(#policy.max_attempts(#n));
        }
        if let Some(d) = r.backoff {
            let nanos = d.as_nanos() as u64;
            policy = quote!(#policy.initial_backoff(#p::Duration::from_nanos(#nanos)));
        }
        if let Some(d) = r.max_backoff {
            let nanos = d.as_nanos() as u64;
            policy = quote!(#policy.max_backoff(#p::Duration::from_nanos(#nanos)));
        }
        if let Some(m) = r.multiplier {
            policy = quote!(#policy.multiplier(#m));
        }
        if let Some(j) = r.jitter {
            policy = quote!(#policy.jitter(#j));
        }
        quote!(.retry(#policy))
    });
    let timeout = options.timeout.map(|d| {
        let nanos = d.as_nanos() as u64;
        quote!(.timeout(#p::Duration::from_nanos(#nanos)))
    });
    let compensate = options.compensate.as_ref().map(
        |path| quote_spanned!(path.span()=> .compensate(#p::compensation::<#input_ty, #output, _, _>(#path))),
    );
    let compensation_name = match &options.compensate {
        Some(path) => {
            let text = quote!(#path).to_string().replace(' ', "");
            quote!(::core::option::Option::Some(#text))
        }
        None => quote!(::core::option::Option::None),
    };
    let checks = types
        .iter()
        .copied()
        .chain([output])
        .map(|ty| quote_spanned!(ty.span()=> #p::assert_payload::<#ty>();));

    quote! {
        #(#attrs)*
        #vis async fn #ident(
            __hodei_saga: &#p::SagaContext,
            #(#names: #types),*
        ) -> ::core::result::Result<#output, #p::StepError> {
            const _: () = { #(#checks)* };
            #body
            #p::SagaContext::step(__hodei_saga, #name)
                .input(#input_value)
                #retry
                #timeout
                #compensate
                .run(|__hodei_ctx: #p::StepContext, #input_value: #input_ty| async move {
                    ::core::result::Result::map_err(
                        __hodei_step_body(__hodei_ctx, #(#names),*).await,
                        ::core::convert::Into::into,
                    )
                })
                .await
        }

        /// The static description of the step of the same name, read by `#[saga]`.
        #[doc(hidden)]
        #[allow(non_snake_case)]
        #vis mod #ident {
            pub const STEP: #p::StepShape = #p::StepShape::new(#name, #compensation_name);
        }
    }
}

pub fn saga(args: TokenStream, item: TokenStream) -> TokenStream {
    let function: ItemFn = match syn::parse2(item.clone()) {
        Ok(f) => f,
        Err(e) => return unparsable(item, e),
    };
    let mut errors = Errors::default();
    let options = attr::saga_options(args, &mut errors);
    let sig = attr::signature(&function, "saga", "SagaContext", &mut errors);
    if let Some(extra) = sig.inputs.get(1) {
        errors
            .at(extra.span(), "a #[saga] takes its context and one input; put several values in one struct");
    }
    let found = sig.context.as_ref().map(|ctx| step_calls(ctx, &function.block)).unwrap_or_default();
    // A step may appear once per scope: branches run the same step each under its own key, but
    // two calls in one scope are two steps that would share a name.
    let mut seen: Vec<(String, usize)> = Vec::new();
    let mut calls: Vec<&syn::Path> = Vec::new();
    for call in &found {
        let path = &call.path;
        let text = quote!(#path).to_string();
        if seen.contains(&(text.clone(), call.scope)) {
            errors.at(
                path.span(),
                format!("step `{text}` is called twice in this saga; steps need distinct names"),
            );
        }
        if !seen.iter().any(|(t, _)| *t == text) {
            calls.push(path);
        }
        seen.push((text, call.scope));
    }
    let (Some(context), Some(output), true) = (&sig.context, &sig.output, errors.is_empty()) else {
        let errors = errors.into_compile_errors();
        return quote!(#function #errors);
    };

    let Item { p, ident, vis, attrs, name } = Item::new(&function, &options.common);
    let version = options.version.unwrap_or(1);
    let (input_ty, input_arg) = match sig.inputs.first() {
        Some(arg) => (arg.ty.as_ref().clone(), quote!(#arg)),
        None => (syn::parse_quote!(()), quote!(_: ())),
    };
    let returns = &function.sig.output;
    let block = &function.block;
    let checks = [&input_ty, output].map(|ty| quote_spanned!(ty.span()=> #p::assert_payload::<#ty>();));
    let unique = quote_spanned! {ident.span()=>
        const _: () = ::core::assert!(
            #ident::SHAPE.has_unique_step_names(),
            "two steps of this saga share a name; give each a distinct `name = \"...\"`",
        );
    };

    quote! {
        #(#attrs)*
        // Braced, so that the name lives in the type namespace only: a unit struct would also be
        // a value, and turn every `let #ident = ...` or parameter of that name into a pattern.
        #[allow(non_camel_case_types)]
        #[derive(Clone, Copy, Debug, Default)]
        #vis struct #ident {}

        impl #ident {
            /// The definition name.
            pub const NAME: &'static str = #name;
            /// The definition version.
            pub const VERSION: u32 = #version;
            /// The step calls of the body, in source order, with their compensations.
            pub const SHAPE: #p::SagaShape = #p::SagaShape::new(#name, #version, &[#(#calls::STEP),*]);

            /// The definition, to register with an engine.
            pub fn definition() -> #p::SagaDefinition {
                <Self as #p::Saga>::definition()
            }

            /// Starts a run; the id is its idempotency key.
            pub async fn start(
                engine: &#p::Engine,
                id: impl ::core::convert::Into<::std::string::String>,
                input: &#input_ty,
            ) -> ::core::result::Result<#p::TypedHandle<#output>, #p::Error> {
                engine.start_saga::<Self>(id, input).await
            }

            async fn __hodei_saga_body(#context, #input_arg) #returns {
                const _: () = { #(#checks)* };
                #block
            }
        }

        impl #p::Saga for #ident {
            type Input = #input_ty;
            type Output = #output;
            const NAME: &'static str = #name;
            const VERSION: u32 = #version;

            fn definition() -> #p::SagaDefinition {
                #p::SagaDefinition::new(#name, #version, |ctx: #p::SagaContext, input: #input_ty| async move {
                    ::core::result::Result::map_err(
                        #ident::__hodei_saga_body(ctx, input).await,
                        ::core::convert::Into::into,
                    )
                })
                .with_shape(&#ident::SHAPE)
            }
        }

        #unique
    }
}

/// What both expansions take from the annotated function and the shared options.
struct Item<'a> {
    /// `<crate>::__private`, the only path generated code calls into.
    p: TokenStream,
    ident: &'a syn::Ident,
    vis: &'a syn::Visibility,
    attrs: &'a [syn::Attribute],
    /// The `name` option, or the function's name.
    name: String,
}

impl<'a> Item<'a> {
    fn new(function: &'a ItemFn, common: &attr::Common) -> Self {
        let krate = &common.krate;
        let ident = &function.sig.ident;
        Item {
            p: quote!(#krate::__private),
            ident,
            vis: &function.vis,
            attrs: &function.attrs,
            name: common.name.as_ref().map_or_else(|| ident.to_string(), |n| n.value()),
        }
    }
}

/// A step call found in a saga body: the step's path, and the scope it was called in (0 for
/// the body itself, then one per branch closure).
struct StepCall {
    path: syn::Path,
    scope: usize,
}

/// The functions the body calls with a saga context first: its step calls, in source order.
///
/// A context is the saga's own parameter, or the first parameter of a branch closure: one
/// typed `SagaContext`, or one passed to `Branch::new` or as a `matrix` branch. Macro
/// invocations whose arguments parse as expressions (`vec![...]`, `join!(...)`) are read too.
fn step_calls(context: &syn::PatType, block: &syn::Block) -> Vec<StepCall> {
    let Pat::Ident(ctx) = &*context.pat else { return Vec::new() };
    struct Calls {
        contexts: Vec<(syn::Ident, usize)>,
        scopes: usize,
        found: Vec<StepCall>,
    }
    fn first_param(closure: &syn::ExprClosure) -> Option<(&syn::Ident, Option<&syn::Type>)> {
        match closure.inputs.first()? {
            Pat::Ident(p) => Some((&p.ident, None)),
            Pat::Type(t) => match &*t.pat {
                Pat::Ident(p) => Some((&p.ident, Some(&*t.ty))),
                _ => None,
            },
            _ => None,
        }
    }
    fn is_saga_context(ty: &syn::Type) -> bool {
        matches!(ty, syn::Type::Path(p) if p.path.segments.last().is_some_and(|s| s.ident == "SagaContext"))
    }
    impl Calls {
        /// Visits a closure; `branch` says it is known to be a branch from the call it is
        /// passed to, so its first parameter is a context even without a type.
        fn closure(&mut self, closure: &syn::ExprClosure, branch: bool) {
            let context = first_param(closure)
                .filter(|(_, ty)| branch || ty.is_some_and(is_saga_context))
                .map(|(ident, _)| ident.clone());
            match context {
                Some(ident) => {
                    self.scopes += 1;
                    self.contexts.push((ident, self.scopes));
                    syn::visit::visit_expr_closure(self, closure);
                    self.contexts.pop();
                }
                None => syn::visit::visit_expr_closure(self, closure),
            }
        }
        fn branch_args<'a>(&mut self, args: impl IntoIterator<Item = &'a Expr>) {
            for arg in args {
                match arg {
                    Expr::Closure(closure) => self.closure(closure, true),
                    other => self.visit_expr(other),
                }
            }
        }
    }
    impl<'ast> Visit<'ast> for Calls {
        fn visit_expr_call(&mut self, call: &'ast syn::ExprCall) {
            if let (Expr::Path(callee), Some(Expr::Reference(first))) = (&*call.func, call.args.first())
                && let Expr::Path(arg) = &*first.expr
                && callee.qself.is_none()
                && let Some((_, scope)) = self.contexts.iter().rev().find(|(c, _)| arg.path.is_ident(c))
            {
                self.found.push(StepCall { path: callee.path.clone(), scope: *scope });
            }
            let branch_new = matches!(&*call.func, Expr::Path(callee)
                if callee.path.segments.len() >= 2
                    && callee.path.segments.iter().rev().nth(1).is_some_and(|s| s.ident == "Branch")
                    && callee.path.segments.last().is_some_and(|s| s.ident == "new"));
            if branch_new {
                self.visit_expr(&call.func);
                self.branch_args(&call.args);
            } else {
                syn::visit::visit_expr_call(self, call);
            }
        }
        fn visit_expr_method_call(&mut self, call: &'ast syn::ExprMethodCall) {
            if call.method == "matrix" {
                self.visit_expr(&call.receiver);
                self.branch_args(&call.args);
            } else {
                syn::visit::visit_expr_method_call(self, call);
            }
        }
        fn visit_expr_closure(&mut self, closure: &'ast syn::ExprClosure) {
            self.closure(closure, false);
        }
        fn visit_macro(&mut self, mac: &'ast syn::Macro) {
            use syn::punctuated::Punctuated;
            if let Ok(args) = mac.parse_body_with(Punctuated::<Expr, syn::Token![,]>::parse_terminated) {
                for arg in &args {
                    self.visit_expr(arg);
                }
            }
        }
        // Nested items have scopes of their own.
        fn visit_item(&mut self, _: &'ast syn::Item) {}
    }
    let mut calls = Calls { contexts: vec![(ctx.ident.clone(), 0)], scopes: 0, found: Vec::new() };
    calls.visit_block(block);
    calls.found
}
