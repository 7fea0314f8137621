package main

import (
	"bufio"
	"bytes"
	"fmt"
	"go/ast"
	"go/parser"
	"go/token"
	"os/exec"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"testing"
)

// processStarters are the calls that run another program, by import path.
var processStarters = map[string][]string{
	"os/exec":                            nil, // importing it at all
	"os":                                 {"StartProcess"},
	"syscall":                            {"Exec", "ForkExec", "StartProcess"},
	"golang.org/x/sys/unix":              {"Exec"},
	"github.com/NVIDIA/go-dcgm/pkg/dcgm": {"StartHostengine"}, // the mode that forks nv-hostengine
}

// thirdPartyExec are the dependencies known to import os/exec, and why the
// binary still never runs a program through them. A new one fails the test
// until someone has checked it and added it here.
var thirdPartyExec = map[string]string{
	"github.com/NVIDIA/go-dcgm/pkg/dcgm": "only dcgm.Init(dcgm.StartHostengine) runs nv-hostengine; " +
		"internal/telemetry/dcgmbackend uses Embedded and Standalone, and the walk below forbids StartHostengine",
}

// ownExec are this module's packages allowed to run a program, and what
// they run. Nothing else may.
var ownExec = map[string]string{
	"github.com/gpu-plugin/gpu-plugin/internal/mps": "nvidia-cuda-mps-control, and only for sharing.mps: " +
		"MPS has no API but its control program, as NVIDIA's mps-control-daemon runs it",
}

// TestNoShellingOut: the daemon never runs another program (nvidia-smi, a
// shell) except nvidia-cuda-mps-control for MPS (ownExec): none of this
// module's other packages linked into the binary imports os/exec or calls
// a process-starting function, and the third-party packages that import
// os/exec are the reviewed ones.
// The package list is `go list -deps` of this command, so it is exactly
// what the binary links, cgo files included.
func TestNoShellingOut(t *testing.T) {
	goTool, err := exec.LookPath("go")
	if err != nil {
		t.Skip("the go tool is not on PATH")
	}
	cmd := exec.Command(goTool, "list", "-deps", "-f",
		`{{if not .Standard}}{{.ImportPath}}	{{.Module.Path}}	{{.Dir}}	{{join .GoFiles ","}},{{join .CgoFiles ","}}	{{join .Imports ","}}{{end}}`, ".")
	out, err := cmd.Output()
	if err != nil {
		t.Fatalf("go list -deps: %v", err)
	}
	const module = "github.com/gpu-plugin/gpu-plugin"
	ours, importers := 0, map[string]bool{}
	sc := bufio.NewScanner(bytes.NewReader(out))
	sc.Buffer(nil, 1<<20)
	for sc.Scan() {
		f := strings.Split(sc.Text(), "\t")
		if len(f) != 5 {
			continue
		}
		path, mod, dir, files, imports := f[0], f[1], f[2], f[3], strings.Split(f[4], ",")
		if mod != module {
			if slices.Contains(imports, "os/exec") {
				importers[path] = true
			}
			continue
		}
		ours++
		if why, ok := ownExec[path]; ok {
			t.Logf("%s runs %s", path, why)
			continue
		}
		for _, name := range strings.Split(files, ",") {
			if name == "" {
				continue
			}
			problems, err := processProblems(filepath.Join(dir, name), nil)
			if err != nil {
				t.Fatal(err)
			}
			for _, p := range problems {
				t.Errorf("%s: the daemon must not run programs", p)
			}
		}
	}
	if ours < 5 {
		t.Fatalf("go list found only %d of this module's packages in the binary:\n%s", ours, out)
	}
	for path := range importers {
		if _, ok := thirdPartyExec[path]; !ok {
			t.Errorf("dependency %s imports os/exec: check that the binary never reaches it, then list it in thirdPartyExec with the reason", path)
		}
	}
	for path, why := range thirdPartyExec {
		if importers[path] {
			t.Logf("%s imports os/exec: %s", path, why)
		}
	}
}

// processProblems lists src's imports of os/exec and uses of process
// starters (src is read from path when nil).
func processProblems(path string, src any) ([]string, error) {
	fset := token.NewFileSet()
	file, err := parser.ParseFile(fset, path, src, parser.SkipObjectResolution)
	if err != nil {
		return nil, err
	}
	var out []string
	names := map[string]string{} // local name → import path
	for _, imp := range file.Imports {
		p, _ := strconv.Unquote(imp.Path.Value)
		if _, watched := processStarters[p]; !watched {
			continue
		}
		if p == "os/exec" {
			out = append(out, fmt.Sprintf("%s imports os/exec", fset.Position(imp.Pos())))
		}
		local := filepath.Base(p)
		if imp.Name != nil {
			local = imp.Name.Name
		}
		names[local] = p
	}
	ast.Inspect(file, func(n ast.Node) bool {
		sel, ok := n.(*ast.SelectorExpr)
		if !ok {
			return true
		}
		if id, ok := sel.X.(*ast.Ident); ok && slices.Contains(processStarters[names[id.Name]], sel.Sel.Name) {
			out = append(out, fmt.Sprintf("%s uses %s.%s", fset.Position(sel.Pos()), names[id.Name], sel.Sel.Name))
		}
		return true
	})
	return out, nil
}

// TestProcessProblems: the walk finds what it looks for, under any import
// name.
func TestProcessProblems(t *testing.T) {
	src := `package x

import (
	"os/exec"
	sc "syscall"
	"os"
	"github.com/NVIDIA/go-dcgm/pkg/dcgm"
)

func f() {
	exec.Command("nvidia-smi")
	sc.ForkExec("/bin/sh", nil, nil)
	os.StartProcess("/bin/sh", nil, nil)
	os.Getpid()
	dcgm.Init(dcgm.StartHostengine)
	dcgm.Init(dcgm.Embedded)
}
`
	got, err := processProblems("x.go", src)
	if err != nil {
		t.Fatal(err)
	}
	want := []string{"x.go:4:2 imports os/exec", "x.go:12:2 uses syscall.ForkExec", "x.go:13:2 uses os.StartProcess", "x.go:15:12 uses github.com/NVIDIA/go-dcgm/pkg/dcgm.StartHostengine"}
	if !slices.Equal(got, want) {
		t.Errorf("found %q, want %q", got, want)
	}
}
