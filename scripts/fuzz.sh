#!/usr/bin/env bash
# Runs every fuzz target of the root module for FUZZTIME each (default 10s),
# one target at a time, as `make fuzz` and CI do. Targets are found, not
# listed: any `func FuzzXxx(f *testing.F)` in a package of the root module
# runs, so a new target cannot be forgotten. Nested modules (tests/) are not
# packages of the root module and are left out.
#
# A crash fails the run after every target has had its turn; go test writes
# the failing input to <package>/testdata/fuzz/<Target>/, where it becomes
# part of the committed seed corpus once the bug is fixed.
#
#   FUZZTIME=30s make fuzz             # longer
#   FUZZ='Counters|Control' make fuzz  # only targets matching a regexp
#   FUZZMINIMIZETIME=60s make fuzz     # go test's default minimization
set -euo pipefail
cd "$(dirname "$0")/.."
export CGO_ENABLED=1
export CGO_CFLAGS="${CGO_CFLAGS:--O2 -g -Wno-deprecated-declarations}"
FUZZTIME="${FUZZTIME:-10s}"
# go test minimizes every input that finds new code for up to 60 s, which
# can eat a short run whole; bound it so the time goes to fuzzing.
FUZZMINIMIZETIME="${FUZZMINIMIZETIME:-3s}"
FUZZ="${FUZZ:-.}"

# package import path and directory, one pair a line, root module only
mapfile -t pkgs < <(go list -f '{{.ImportPath}} {{.Dir}}' ./...)
targets=()
for line in "${pkgs[@]}"; do
	pkg=${line%% *} dir=${line#* }
	shopt -s nullglob
	files=("$dir"/*_test.go)
	shopt -u nullglob
	[ ${#files[@]} -gt 0 ] || continue
	while read -r name; do
		[[ $name =~ $FUZZ ]] && targets+=("$pkg $dir $name")
	done < <(sed -n 's/^func \(Fuzz[A-Za-z0-9_]*\)(.*\*testing\.F).*/\1/p' "${files[@]}" | sort -u)
done
if [ ${#targets[@]} -eq 0 ]; then
	echo "no fuzz targets match FUZZ=$FUZZ" >&2
	exit 1
fi

echo "fuzzing ${#targets[@]} targets for $FUZZTIME each"
failed=()
start=$SECONDS
flaked=()
for t in "${targets[@]}"; do
	read -r pkg dir name <<<"$t"
	printf '\n== %s %s\n' "$name" "$pkg"
	corpus="$dir/testdata/fuzz/$name"
	before=$({ ls "$corpus" 2>/dev/null || true; } | wc -l)
	log=$(mktemp)
	if go test -run '^$' -fuzz "^${name}\$" -fuzztime "$FUZZTIME" -fuzzminimizetime "$FUZZMINIMIZETIME" "$pkg" 2>&1 | tee "$log"; then
		rm -f "$log"
		continue
	fi
	after=$({ ls "$corpus" 2>/dev/null || true; } | wc -l)
	# Go 1.26's fuzz coordinator can report its own -fuzztime deadline as a
	# failure when a worker is mid-call as time runs out (golang/go#75804,
	# fixed in Go 1.27). That failure writes no input; a real one always does.
	if [ "$after" = "$before" ] && grep -q '^    context deadline exceeded$' "$log" && ! grep -q 'Failing input written' "$log"; then
		echo "(not a crash: golang/go#75804, the fuzz coordinator's deadline race; no input was written)"
		flaked+=("$name ($pkg)")
	else
		failed+=("$name ($pkg)")
	fi
	rm -f "$log"
done
printf '\nfuzzing took %ds\n' $((SECONDS - start))
if [ ${#flaked[@]} -gt 0 ]; then
	echo "targets stopped by golang/go#75804 (Go's deadline race, not a crash):"
	printf '  %s\n' "${flaked[@]}"
fi
if [ ${#failed[@]} -gt 0 ]; then
	echo "fuzz targets that failed (the crashing input is under the package's testdata/fuzz/<target>/; fix the bug and commit it):" >&2
	printf '  %s\n' "${failed[@]}" >&2
	exit 1
fi
