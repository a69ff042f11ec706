#!/bin/sh
# Builds the Hodei agent image from this checkout: a static hodei-agent on an empty image.
#
#   docker/build-agent-image.sh [TAG]                (default tag: hodei-agent:latest)
#   docker/build-agent-image.sh --with-tools [TAG]   also builds hodei-agent:tools (or
#                                                    $HODEI_TOOLS_IMAGE): the agent image plus
#                                                    the host's sh and a few coreutils
#
# Needs cargo and a Docker engine; pulls nothing, so it works without a registry.
set -eu
with_tools=false
if [ "${1:-}" = "--with-tools" ]; then
    with_tools=true
    shift
fi
tag="${1:-hodei-agent:latest}"
tools_tag="${HODEI_TOOLS_IMAGE:-hodei-agent:tools}"
root="$(cd "$(dirname "$0")/.." && pwd)"
target=x86_64-unknown-linux-gnu
# What the examples' jobs run: a shell and the file tools of a checkout/build/test pipeline.
tools="sh cat ls mkdir cp chmod cut sha256sum base64 sleep"

# crt-static links glibc in; with an explicit --target the flag reaches only the agent, not
# build scripts or proc macros. Release: the image is a tenth of a debug build's size, and the
# agent's TLS handshake, on every cold start, is many times faster.
RUSTFLAGS='-C target-feature=+crt-static' cargo build --manifest-path "$root/Cargo.toml" \
    -p hodei-agent --bin hodei-agent --target "$target" --release

# A context holding only the binary, so that docker sends a few MiB rather than target/.
context="$(mktemp -d)"
trap 'rm -rf "$context"' EXIT
cp "$root/target/$target/release/hodei-agent" "$context/hodei-agent"
docker build --tag "$tag" --file "$root/docker/Dockerfile" "$context"

if $with_tools; then
    rootfs="$context/rootfs"
    mkdir -p "$rootfs/usr/bin" "$rootfs/tmp"
    # Jobs run as the agent's unprivileged user and need somewhere to write.
    chmod 1777 "$rootfs/tmp"
    # Both /bin/sh and /usr/bin/sh, whichever a job names.
    ln -s usr/bin "$rootfs/bin"
    for tool in $tools; do
        path="$(command -v "$tool")" || { echo "no $tool on this host" >&2; exit 1; }
        cp -L "$path" "$rootfs/usr/bin/$tool"
        # Lines are `libc.so.6 => /lib/.../libc.so.6 (0x...)` or `/lib64/ld-linux-x86-64.so.2
        # (0x...)`; the vDSO has no file. Copied to the same path, since that is where the
        # binary's loader and its own loader path look.
        for library in $(ldd "$path" | sed -n -e 's/.*=> \(\/[^ ]*\).*/\1/p' -e t -e 's/^[[:space:]]*\(\/[^ ]*\).*/\1/p'); do
            mkdir -p "$rootfs$(dirname "$library")"
            cp -L "$library" "$rootfs$library"
        done
    done
    docker build --tag "$tools_tag" --build-arg "AGENT_IMAGE=$tag" \
        --file "$root/docker/Dockerfile.tools" "$context"
    docker image ls "$tools_tag"
fi
docker image ls "$tag"
