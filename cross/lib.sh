# Sourced by cross/build, cross/test and cross/package: the cross toolchain
# for each supported target, given to cargo as environment variables only,
# so host builds (`cargo build`, `cargo test`) never see any of it.
#
# Targets:
#   aarch64-unknown-linux-gnu      64-bit Raspberry Pi OS / Debian 12 (glibc 2.36):
#                                  Debian's aarch64-linux-gnu-gcc links and builds C.
#   aarch64-unknown-linux-musl     fully static: zig (PyPI `ziglang`) compiles C
#                                  through cross/zigcc, Debian's aarch64 gcc links.
#   armv7-unknown-linux-gnueabihf  32-bit Raspberry Pi OS (Pi 2 and later):
#                                  Debian's arm-linux-gnueabihf-gcc.
# `cross/install` installs all of it.

CROSS_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
REPO=$(cd "$CROSS_DIR/.." && pwd)
CROSS_TARGETS=(aarch64-unknown-linux-gnu aarch64-unknown-linux-musl armv7-unknown-linux-gnueabihf)
DEFAULT_TARGET=aarch64-unknown-linux-gnu
# Cross artifacts live apart from the host's: separate cargo locks, so a
# cross build never waits on (or invalidates) a host build.
CROSS_TARGET_DIR=${FERRY_CROSS_TARGET_DIR:-${CARGO_TARGET_DIR:-$REPO/target}/cross}
# Where cross/install puts zig (pip --target): no dependence on which python runs.
FERRY_ZIG_DIR=${FERRY_ZIG_DIR:-/opt/ferry-cross/zig}

log() { printf '[cross] %s\n' "$*" >&2; }
die() { printf '[cross] error: %s\n' "$*" >&2; exit 1; }

known_target() {
  local t
  for t in "${CROSS_TARGETS[@]}"; do [ "$t" = "$1" ] && return 0; done
  return 1
}

# cargo's env var spelling of a target: CC_<t> uses underscores,
# CARGO_TARGET_<T>_* upper case.
target_us() { echo "${1//-/_}"; }
target_uc() { target_us "$1" | tr '[:lower:]' '[:upper:]'; }

need() { command -v "$1" >/dev/null || die "$1 not found: run cross/install ($2)"; }

# The qemu command line that runs a binary of target $1.
qemu_runner() {
  case "$1" in
    aarch64-unknown-linux-gnu) echo "qemu-aarch64 -L /usr/aarch64-linux-gnu" ;;
    aarch64-unknown-linux-musl) echo "qemu-aarch64" ;;
    armv7-unknown-linux-gnueabihf) echo "qemu-arm -L /usr/arm-linux-gnueabihf" ;;
  esac
}

# Exports the variables cargo and cc-rs read for target $1 (in this process
# and its children only) and checks the tools are there.
cross_env() {
  local t=$1 us uc
  known_target "$t" || die "unknown target $t (known: ${CROSS_TARGETS[*]})"
  us=$(target_us "$t")
  uc=$(target_uc "$t")
  rustup target list --installed | grep -qx "$t" || die "rust target $t is not installed: run cross/install"
  case "$t" in
    aarch64-unknown-linux-gnu)
      need aarch64-linux-gnu-gcc "gcc-aarch64-linux-gnu"
      need qemu-aarch64 "qemu-user"
      export "CC_$us=aarch64-linux-gnu-gcc" "AR_$us=aarch64-linux-gnu-ar"
      export "CARGO_TARGET_${uc}_LINKER=aarch64-linux-gnu-gcc"
      ;;
    aarch64-unknown-linux-musl)
      need aarch64-linux-gnu-gcc "gcc-aarch64-linux-gnu"
      need qemu-aarch64 "qemu-user"
      [ -x "$FERRY_ZIG_DIR/ziglang/zig" ] || die "zig not found in $FERRY_ZIG_DIR: run cross/install"
      export FERRY_ZIG="$FERRY_ZIG_DIR/ziglang/zig" FERRY_ZIG_TARGET=aarch64-linux-musl
      export "CC_$us=$CROSS_DIR/zigcc" "AR_$us=aarch64-linux-gnu-ar"
      # zig as the linker fails; rustc's self-contained musl crt objects and
      # libc.a plus Debian's gcc driver link a static binary.
      export "CARGO_TARGET_${uc}_LINKER=aarch64-linux-gnu-gcc"
      ;;
    armv7-unknown-linux-gnueabihf)
      need arm-linux-gnueabihf-gcc "gcc-arm-linux-gnueabihf"
      need qemu-arm "qemu-user"
      export "CC_$us=arm-linux-gnueabihf-gcc" "AR_$us=arm-linux-gnueabihf-ar"
      export "CARGO_TARGET_${uc}_LINKER=arm-linux-gnueabihf-gcc"
      ;;
  esac
  export "CARGO_TARGET_${uc}_RUNNER=$(qemu_runner "$t")"
  export CARGO_TARGET_DIR="$CROSS_TARGET_DIR"
}

# The release binary of target $1 (after a build).
cross_binary() { echo "$CROSS_TARGET_DIR/$1/release/ferry"; }
