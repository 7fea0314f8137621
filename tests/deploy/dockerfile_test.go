package deploy

import (
	"debug/elf"
	"io/fs"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"slices"
	"strings"
	"testing"

	"golang.org/x/mod/modfile"
	"golang.org/x/mod/semver"
)

// instruction is one Dockerfile instruction, continuation lines joined.
type instruction struct {
	Cmd     string // upper case: FROM, RUN, ...
	Args    string
	Comment string // the comment lines right above it
	Stage   int    // index of the FROM it belongs to
}

func parseDockerfile(t *testing.T) []instruction {
	t.Helper()
	var out []instruction
	var comment []string
	stage := -1
	lines := strings.Split(string(readFile(t, DockerfilePath)), "\n")
	for i := 0; i < len(lines); i++ {
		l := strings.TrimSpace(lines[i])
		switch {
		case l == "":
			comment = nil
			continue
		case strings.HasPrefix(l, "#"):
			comment = append(comment, strings.TrimSpace(strings.TrimPrefix(l, "#")))
			continue
		}
		for strings.HasSuffix(l, "\\") && i+1 < len(lines) {
			i++
			l = strings.TrimSuffix(l, "\\") + " " + strings.TrimSpace(lines[i])
		}
		cmd, args, _ := strings.Cut(l, " ")
		cmd = strings.ToUpper(cmd)
		if cmd == "FROM" {
			stage++
		}
		out = append(out, instruction{Cmd: cmd, Args: strings.TrimSpace(args), Comment: strings.Join(comment, " "), Stage: stage})
		comment = nil
	}
	return out
}

// argDefaults are the ARG defaults declared before the first FROM.
func argDefaults(ins []instruction) map[string]string {
	out := map[string]string{}
	for _, in := range ins {
		if in.Cmd == "ARG" && in.Stage < 0 {
			k, v, _ := strings.Cut(in.Args, "=")
			out[k] = v
		}
	}
	return out
}

func expandArgs(s string, args map[string]string) string {
	return os.Expand(s, func(k string) string { return args[k] })
}

// debianOf maps a base image to its Debian release, the glibc it brings.
var debianOf = map[string]string{
	"gcr.io/distroless/base-debian12:latest": "bookworm",
	"gcr.io/distroless/cc-debian12:latest":   "bookworm",
	"debian:bookworm-slim":                   "bookworm",
	"gcr.io/distroless/base-debian13:latest": "trixie",
	"debian:trixie-slim":                     "trixie",
}

// TestDockerfile checks the Dockerfile by reading it: two stages, a cgo
// build on the same Debian release as the glibc runtime image, the version
// injected, OCI labels, the documented user, the metrics port.
func TestDockerfile(t *testing.T) {
	ins := parseDockerfile(t)
	args := argDefaults(ins)
	var froms []string
	for _, in := range ins {
		if in.Cmd == "FROM" {
			froms = append(froms, in.Args)
		}
	}
	if len(froms) != 2 {
		t.Fatalf("FROM lines %v: want a build stage and a runtime stage", froms)
	}
	build, runtimeImage := expandArgs(strings.Fields(froms[0])[0], args), expandArgs(strings.Fields(froms[1])[0], args)
	runtimeImage, _, _ = strings.Cut(runtimeImage, "@") // a digest pin keeps the name
	m := regexp.MustCompile(`^golang:([0-9.]+)-([a-z]+)$`).FindStringSubmatch(build)
	if m == nil {
		t.Fatalf("build stage %q: want golang:<version>-<debian release>", build)
	}
	release, ok := debianOf[runtimeImage]
	if !ok {
		t.Fatalf("runtime image %q is not a known glibc image (%v)", runtimeImage, debianOf)
	}
	if m[2] != release {
		t.Errorf("the build stage is Debian %s but the runtime image %s is %s: the binary could need a newer glibc than it gets", m[2], runtimeImage, release)
	}
	mod, err := modfile.Parse("go.mod", readFile(t, "go.mod"), nil)
	if err != nil {
		t.Fatal(err)
	}
	if semver.Compare("v"+m[1], "v"+mod.Go.Version) < 0 {
		t.Errorf("GO_VERSION %s is older than go.mod's go %s", m[1], mod.Go.Version)
	}

	labels := map[string]bool{}
	var user, entrypoint, expose []instruction
	for _, in := range ins {
		switch in.Cmd {
		case "LABEL":
			for _, k := range regexp.MustCompile(`(org\.opencontainers\.image\.[a-z.]+)=`).FindAllStringSubmatch(in.Args, -1) {
				labels[k[1]] = true
			}
		case "USER":
			user = append(user, in)
		case "ENTRYPOINT":
			entrypoint = append(entrypoint, in)
		case "EXPOSE":
			expose = append(expose, in)
		case "ENV":
			if in.Stage == 0 && !strings.Contains(in.Args, "CGO_ENABLED=1") {
				t.Errorf("build stage ENV %q lacks CGO_ENABLED=1 (go-nvml needs cgo)", in.Args)
			}
		}
	}
	for _, k := range []string{"title", "description", "source", "version", "revision", "created"} {
		if !labels["org.opencontainers.image."+k] {
			t.Errorf("no OCI label org.opencontainers.image.%s", k)
		}
	}
	if len(user) != 1 || user[0].Args != "0:0" || !strings.Contains(user[0].Comment, "CAP_DAC_OVERRIDE") {
		t.Errorf("USER %+v: want one USER 0:0 with the comment that justifies it", user)
	}
	if len(entrypoint) != 1 || entrypoint[0].Args != `["/usr/bin/gpu-plugin"]` {
		t.Errorf("ENTRYPOINT %+v, want [\"/usr/bin/gpu-plugin\"]", entrypoint)
	}
	if len(expose) != 1 || expose[0].Args != "9400" {
		t.Errorf("EXPOSE %+v, want 9400 (the chart's metrics port)", expose)
	}
	line := goBuildLine(t, ins)
	if !strings.Contains(line, "-X github.com/gpu-plugin/gpu-plugin/internal/version.version=${VERSION}") {
		t.Errorf("the go build line does not inject the version: %s", line)
	}
}

// goBuildLine is the build stage's RUN that builds the binary, without its
// --mount options.
func goBuildLine(t *testing.T, ins []instruction) string {
	t.Helper()
	for _, in := range ins {
		if in.Cmd == "RUN" && in.Stage == 0 && strings.Contains(in.Args, "go build") {
			return strings.TrimSpace(regexp.MustCompile(`--mount=\S+\s*`).ReplaceAllString(in.Args, ""))
		}
	}
	t.Fatal("no RUN ... go build in the build stage")
	return ""
}

// TestDockerfileBuildCommand runs the Dockerfile's own go build line, outside
// Docker, in a directory holding only what the Dockerfile copies (after
// .dockerignore), and checks the binary: it prints the injected version and
// needs nothing from the runtime image beyond glibc.
func TestDockerfileBuildCommand(t *testing.T) {
	if testing.Short() {
		t.Skip("builds the binary (-short)")
	}
	ins := parseDockerfile(t)
	ctx := t.TempDir()
	ignore := dockerignore(t)
	for _, in := range ins {
		if in.Cmd != "COPY" || in.Stage != 0 || strings.HasPrefix(in.Args, "--from") {
			continue
		}
		srcs := strings.Fields(in.Args)
		for _, src := range srcs[:len(srcs)-1] {
			copyContext(t, filepath.Join(RepoRoot(), src), filepath.Join(ctx, src), ignore)
		}
	}
	out := t.TempDir()
	const version = "v0.0.0-dockerfile-test"
	cmd := strings.ReplaceAll(goBuildLine(t, ins), "/out/", out+"/")
	run := exec.Command("sh", "-c", cmd)
	run.Dir = ctx
	run.Env = append(os.Environ(), "VERSION="+version, "CGO_ENABLED=1", "CGO_CFLAGS=-O2 -g -Wno-deprecated-declarations", "GOFLAGS=-buildvcs=false")
	got, err := run.CombinedOutput()
	if err != nil {
		t.Fatalf("the Dockerfile's build command failed in a context of only the copied files:\n%s\n%v\n%s", cmd, err, got)
	}
	if !strings.Contains(string(got), version) {
		t.Errorf("gpu-plugin --version printed %q, want the injected %s", got, version)
	}

	f, err := elf.Open(filepath.Join(out, "gpu-plugin"))
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	needed, err := f.ImportedLibraries()
	if err != nil {
		t.Fatal(err)
	}
	glibc := []string{"libc.so.6", "libm.so.6", "libpthread.so.0", "libdl.so.2", "libresolv.so.2", "librt.so.1", "ld-linux-x86-64.so.2", "ld-linux-aarch64.so.1"}
	for _, lib := range needed {
		if !slices.Contains(glibc, lib) {
			t.Errorf("the binary needs %s, which the glibc-only runtime image lacks (NEEDED: %v)", lib, needed)
		}
	}
}

// dockerignore returns a matcher for .dockerignore's patterns (the subset
// this repository uses: globs, "**/" prefixes, "!" exceptions).
func dockerignore(t *testing.T) func(rel string, dir bool) bool {
	t.Helper()
	var pats []string
	for _, l := range strings.Split(string(readFile(t, DockerignorePath)), "\n") {
		if l = strings.TrimSpace(l); l != "" && !strings.HasPrefix(l, "#") {
			pats = append(pats, l)
		}
	}
	return func(rel string, dir bool) bool {
		ignored := false
		for _, p := range pats {
			neg := strings.HasPrefix(p, "!")
			p = strings.TrimSuffix(strings.TrimPrefix(p, "!"), "/")
			match := false
			if rest, ok := strings.CutPrefix(p, "**/"); ok {
				ok1, _ := filepath.Match(rest, filepath.Base(rel))
				match = ok1
			} else if ok, _ := filepath.Match(p, rel); ok {
				match = true
			} else if strings.HasPrefix(rel, p+"/") {
				match = true
			}
			if match {
				ignored = !neg
			}
		}
		return ignored
	}
}

func copyContext(t *testing.T, src, dst string, ignored func(string, bool) bool) {
	t.Helper()
	root := RepoRoot()
	err := filepath.WalkDir(src, func(p string, d fs.DirEntry, err error) error {
		if err != nil {
			return err
		}
		rel, _ := filepath.Rel(root, p)
		if ignored(rel, d.IsDir()) {
			if d.IsDir() {
				return filepath.SkipDir
			}
			return nil
		}
		target := filepath.Join(dst, strings.TrimPrefix(p, src))
		if d.IsDir() {
			return os.MkdirAll(target, 0o755)
		}
		if !d.Type().IsRegular() {
			return nil
		}
		b, err := os.ReadFile(p)
		if err != nil {
			return err
		}
		return os.WriteFile(target, b, 0o644)
	})
	if err != nil {
		t.Fatalf("copying the build context: %v", err)
	}
}

// TestMakeTargets: the Makefile has the targets the README and CI name, and
// `make image` passes the version to docker build.
func TestMakeTargets(t *testing.T) {
	if _, err := exec.LookPath("make"); err != nil {
		t.Skip("make not installed")
	}
	for _, target := range []string{"build", "test", "demo", "image", "lint", "bench", "manifests"} {
		out, err := exec.Command("make", "-n", "-C", RepoRoot(), target).CombinedOutput()
		if err != nil {
			t.Errorf("make -n %s: %v\n%s", target, err, out)
			continue
		}
		if target == "image" && !regexp.MustCompile(`docker build .*--build-arg VERSION=\S+`).Match(out) {
			t.Errorf("make image does not pass VERSION to docker build:\n%s", out)
		}
	}
}
