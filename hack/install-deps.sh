#!/usr/bin/env bash
# Installs everything the integration tests need on a fresh Debian machine:
# a few apt packages and pinned, Go-built containerd/runc/registry binaries.
#
# Idempotent: apt is only touched when a package is missing, and a Go tool is
# only rebuilt when its binary is missing or <bin>/.versions records another
# version. Binaries go to ${SEAMLESS_TOOLS_BIN:-<repo>/_output/tools}.
set -euo pipefail

CONTAINERD_VERSION=v2.4.2
RUNC_VERSION=v1.5.3
DISTRIBUTION_VERSION=v3.1.2

APT_PACKAGES=(libseccomp-dev pkg-config busybox-static btrfs-progs xfsprogs e2fsprogs util-linux)

REPO_ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
BIN_DIR=${SEAMLESS_TOOLS_BIN:-$REPO_ROOT/_output/tools}
STAMP_FILE= # set in main, once BIN_DIR is absolute

log() { printf '%s\n' "$*"; }
die() { printf 'install-deps: %s\n' "$*" >&2; exit 1; }

as_root() {
	if [[ $EUID -eq 0 ]]; then
		"$@"
	elif command -v sudo >/dev/null; then
		sudo "$@"
	else
		die "need root (or sudo) to run: $*"
	fi
}

install_apt_packages() {
	local missing=() pkg
	for pkg in "${APT_PACKAGES[@]}"; do
		if ! dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q 'install ok installed'; then
			missing+=("$pkg")
		fi
	done
	if [[ ${#missing[@]} -eq 0 ]]; then
		log "apt: all ${#APT_PACKAGES[@]} packages present"
		return
	fi
	log "apt: installing ${missing[*]}"
	as_root env DEBIAN_FRONTEND=noninteractive apt-get update -qq
	as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
}

stamped_version() {
	[[ -f $STAMP_FILE ]] || return 0
	sed -n "s/^$1=//p" "$STAMP_FILE" | tail -n1
}

write_stamp() {
	local tool=$1 version=$2 tmp
	tmp=$(mktemp "$STAMP_FILE.XXXXXX")
	if [[ -f $STAMP_FILE ]]; then
		grep -v "^$tool=" "$STAMP_FILE" >"$tmp" || true
	fi
	echo "$tool=$version" >>"$tmp"
	sort -o "$tmp" "$tmp"
	chmod 644 "$tmp"
	mv "$tmp" "$STAMP_FILE"
}

# go_build <module> <version> <package> <binary> [go build flags...]
#
# Prefers `go install pkg@version`. That refuses modules whose go.mod has
# replace directives; for those, build inside the downloaded module directory
# instead, where the module's own go.mod (replaces included) is in effect.
go_build() {
	local module=$1 version=$2 pkg=$3 bin=$4
	shift 4
	local errlog
	errlog=$(mktemp)
	if GOBIN=$BIN_DIR go install "$@" "$pkg@$version" 2>"$errlog"; then
		# go install names the binary after the package path's last element.
		if [[ $(basename "$pkg") != "$bin" ]]; then
			mv -f "$BIN_DIR/$(basename "$pkg")" "$BIN_DIR/$bin"
		fi
		rm -f "$errlog"
		return
	fi
	if ! grep -q 'replace directives' "$errlog"; then
		cat "$errlog" >&2
		rm -f "$errlog"
		return 1
	fi
	rm -f "$errlog"
	local dir rel scratch
	# Run outside any module so the download does not touch a go.mod/go.sum.
	scratch=$(mktemp -d)
	dir=$(cd "$scratch" && go mod download -json "$module@$version" |
		sed -n 's/^[[:space:]]*"Dir": "\(.*\)",$/\1/p')
	rmdir "$scratch"
	[[ -n $dir ]] || die "go mod download $module@$version: no module directory"
	rel=.${pkg#"$module"}
	(cd "$dir" && go build "$@" -o "$BIN_DIR/$bin" "$rel")
}

# ensure_tool <binary> <version> <module> <package> [go build flags...]
ensure_tool() {
	local bin=$1 version=$2
	if [[ -x $BIN_DIR/$bin && $(stamped_version "$bin") == "$version" ]]; then
		log "$bin $version: up to date ($BIN_DIR/$bin)"
		return
	fi
	local start=$SECONDS
	go_build "$3" "$version" "$4" "$bin" "${@:5}" || die "building $bin $version failed"
	write_stamp "$bin" "$version"
	log "$bin $version: installed in $((SECONDS - start))s ($BIN_DIR/$bin)"
}

main() {
	install_apt_packages

	command -v go >/dev/null || die "go is not in PATH"
	mkdir -p "$BIN_DIR"
	# GOBIN must be absolute.
	BIN_DIR=$(cd "$BIN_DIR" && pwd)
	STAMP_FILE=$BIN_DIR/.versions
	# Any -mod=... inherited from the caller's module would break `pkg@version`.
	export GOFLAGS=-buildvcs=false

	local ctrd=github.com/containerd/containerd/v2
	local ctrd_ldflags="-X $ctrd/version.Version=$CONTAINERD_VERSION"
	# containerd's own Makefile builds the daemon with cgo (btrfs snapshotter)
	# and the shim without, so the shim stays static.
	CGO_ENABLED=1 ensure_tool containerd "$CONTAINERD_VERSION" "$ctrd" "$ctrd/cmd/containerd" -ldflags "$ctrd_ldflags"
	CGO_ENABLED=0 ensure_tool ctr "$CONTAINERD_VERSION" "$ctrd" "$ctrd/cmd/ctr" -ldflags "$ctrd_ldflags"
	CGO_ENABLED=0 ensure_tool containerd-shim-runc-v2 "$CONTAINERD_VERSION" "$ctrd" "$ctrd/cmd/containerd-shim-runc-v2" -ldflags "$ctrd_ldflags"

	# seccomp support needs cgo and libseccomp-dev; without it runc silently
	# ignores the seccomp profile containerd hands it.
	CGO_ENABLED=1 ensure_tool runc "$RUNC_VERSION" github.com/opencontainers/runc github.com/opencontainers/runc -tags seccomp

	local dist=github.com/distribution/distribution/v3
	CGO_ENABLED=0 ensure_tool registry "$DISTRIBUTION_VERSION" "$dist" "$dist/cmd/registry" \
		-ldflags "-X $dist/version.version=$DISTRIBUTION_VERSION"
}

main "$@"
