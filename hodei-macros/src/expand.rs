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
    let calls = sig.context.as_ref().map(|ctx| step_calls(ctx, &function.block)).unwrap_or_default();
    let mut seen: Vec<String> = Vec::new();
    for call in &calls {
        let text = quote!(#call).to_string();
        if seen.contains(&text) {
            errors.at(
                call.span(),
                format!("step `{text}` is called twice in this saga; steps need distinct names"),
            );
        }
        seen.push(text);
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

/// The paths of the functions the body calls with `&ctx` first: its step calls, in source
/// order.
fn step_calls(context: &syn::PatType, block: &syn::Block) -> Vec<syn::Path> {
    let Pat::Ident(ctx) = &*context.pat else { return Vec::new() };
    struct Calls<'a> {
        ctx: &'a syn::Ident,
        found: Vec<syn::Path>,
    }
    impl<'ast> Visit<'ast> for Calls<'_> {
        fn visit_expr_call(&mut self, call: &'ast syn::ExprCall) {
            if let (Expr::Path(callee), Some(Expr::Reference(first))) = (&*call.func, call.args.first())
                && let Expr::Path(arg) = &*first.expr
                && arg.path.is_ident(self.ctx)
                && callee.qself.is_none()
            {
                self.found.push(callee.path.clone());
            }
            syn::visit::visit_expr_call(self, call);
        }
        // Closures and nested items have scopes of their own.
        fn visit_item(&mut self, _: &'ast syn::Item) {}
    }
    let mut calls = Calls { ctx: &ctx.ident, found: Vec::new() };
    calls.visit_block(block);
    calls.found
}
