# Shared by the scripts: install the Debian packages the real-part tests and the demo use.
ensure_packages() {
    local need=()
    [ -x /usr/lib/cni/bridge ] || need+=(containernetworking-plugins)
    command -v ip >/dev/null 2>&1 || need+=(iproute2)
    command -v ping >/dev/null 2>&1 || need+=(iputils-ping)
    [ -x /usr/bin/etcd ] || need+=(etcd-server)
    command -v protoc >/dev/null 2>&1 || need+=(protobuf-compiler)
    command -v openssl >/dev/null 2>&1 || need+=(openssl)
    # The webhook tests send HTTPS requests with curl --cacert.
    command -v curl >/dev/null 2>&1 || need+=(curl)
    # The CRI tests run a private containerd (runc comes with it) and build a static pause binary.
    command -v containerd >/dev/null 2>&1 || need+=(containerd)
    [ -n "$(find /usr/lib -name libc.a -print -quit 2>/dev/null)" ] || need+=(libc6-dev)
    if [ ${#need[@]} -gt 0 ]; then
        if [ "$(id -u)" != 0 ]; then
            echo "missing ${need[*]}: run as root (sudo) so they can be installed" >&2
            exit 1
        fi
        echo "installing ${need[*]}" >&2
        apt-get update -qq
        DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need[@]}" >/dev/null
    fi
    # The observability tests: promtool checks metrics and alert rules, headless Chromium renders
    # the status page. Without recommends: no Prometheus server setup, no desktop extras.
    local lean=()
    command -v promtool >/dev/null 2>&1 || lean+=(prometheus)
    command -v chromium >/dev/null 2>&1 || lean+=(chromium)
    command -v script >/dev/null 2>&1 || lean+=(bsdutils)
    if [ ${#lean[@]} -gt 0 ]; then
        if [ "$(id -u)" != 0 ]; then
            echo "missing ${lean[*]}: run as root (sudo) so they can be installed" >&2
            exit 1
        fi
        echo "installing ${lean[*]}" >&2
        [ ${#need[@]} -gt 0 ] || apt-get update -qq
        DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${lean[@]}" >/dev/null
    fi
}

require_root() {
    if [ "$(id -u)" != 0 ]; then
        echo "$1 creates network namespaces and needs root: run it with sudo" >&2
        exit 1
    fi
}

# build_plugin [release|debug]: allot-ipam as it is installed, statically linked, so that each
# exec by the runtime skips the dynamic loader. Replaces target/<profile>/allot-ipam.
build_plugin() {
    local profile=()
    [ "${1:-release}" = release ] && profile=(--release)
    cargo rustc "${profile[@]}" -p allot-ipam --bin allot-ipam --locked --quiet -- -C target-feature=+crt-static
}
