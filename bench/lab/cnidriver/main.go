// cnidriver runs a conflist through the real libcni (github.com/containernetworking/cni,
// Debian's golang-github-appc-cni-dev), as a runtime does: libcni injects name,
// cniVersion, prevResult and runtimeConfig, converts results, caches them, and
// chooses what CHECK and DEL are sent. The tests build it with
// GO111MODULE=off GOPATH=/usr/share/gocode.
//
//	cnidriver add|check|del < request.json > report.json
//
// The one part that is ours is the plugin exec (libcni's invoke.Exec interface,
// its documented extension point): it does what invoke.RawExec does, and also
// records each plugin's exit status, wall and CPU time and stderr for the tests.
package main

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"syscall"
	"time"

	"github.com/containernetworking/cni/libcni"
	"github.com/containernetworking/cni/pkg/invoke"
	"github.com/containernetworking/cni/pkg/types"
	"github.com/containernetworking/cni/pkg/version"
)

type request struct {
	Conflist       json.RawMessage        `json:"conflist"`
	ContainerID    string                 `json:"containerID"`
	NetNS          string                 `json:"netns"`
	IfName         string                 `json:"ifname"`
	Args           [][2]string            `json:"args"`
	CapabilityArgs map[string]interface{} `json:"capabilityArgs"`
	CacheDir       string                 `json:"cacheDir"`
	Path           []string               `json:"path"`
}

type call struct {
	Plugin     string  `json:"plugin"`
	Command    string  `json:"command"`
	RC         int     `json:"rc"` // negative: killed by that signal
	Seconds    float64 `json:"seconds"`
	CPUSeconds float64 `json:"cpuSeconds"`
	Stderr     string  `json:"stderr"`
}

type report struct {
	Result json.RawMessage `json:"result"`
	Error  *types.Error    `json:"error"` // the plugin's CNI error, if one failed with one
	Text   string          `json:"text"`  // libcni's whole error message
	Calls  []call          `json:"calls"`
}

// recordingExec is invoke.RawExec plus a record of every plugin run.
type recordingExec struct{ calls []call }

func (e *recordingExec) ExecPlugin(ctx context.Context, path string, stdin []byte, environ []string) ([]byte, error) {
	var stdout, stderr bytes.Buffer
	c := exec.CommandContext(ctx, path)
	c.Env, c.Stdin, c.Stdout, c.Stderr = environ, bytes.NewReader(stdin), &stdout, &stderr
	start := time.Now()
	err := c.Run()
	rec := call{Plugin: filepath.Base(path), Seconds: time.Since(start).Seconds(), Stderr: stderr.String()}
	for _, kv := range environ {
		if strings.HasPrefix(kv, "CNI_COMMAND=") {
			rec.Command = strings.TrimPrefix(kv, "CNI_COMMAND=")
		}
	}
	if ps := c.ProcessState; ps != nil {
		rec.RC = ps.ExitCode()
		if ws, ok := ps.Sys().(syscall.WaitStatus); ok && ws.Signaled() {
			rec.RC = -int(ws.Signal())
		}
		if ru, ok := ps.SysUsage().(*syscall.Rusage); ok {
			rec.CPUSeconds = float64(ru.Utime.Nano()+ru.Stime.Nano()) / 1e9
		}
	} else if err != nil {
		rec.RC = 127 // it never started
	}
	e.calls = append(e.calls, rec)
	if err != nil { // as RawExec.pluginErr: the plugin's own error from stdout, if any
		emsg := types.Error{}
		if stdout.Len() == 0 {
			emsg.Msg = fmt.Sprintf("netplugin failed: %q (%v)", stderr.String(), err)
		} else if perr := json.Unmarshal(stdout.Bytes(), &emsg); perr != nil {
			emsg.Msg = fmt.Sprintf("netplugin failed but error parsing its diagnostic message %q: %v", stdout.String(), perr)
		}
		return nil, &emsg
	}
	return stdout.Bytes(), nil
}

func (e *recordingExec) FindInPath(plugin string, paths []string) (string, error) {
	return invoke.FindInPath(plugin, paths)
}

func (e *recordingExec) Decode(jsonBytes []byte) (version.PluginInfo, error) {
	return (&version.PluginDecoder{}).Decode(jsonBytes)
}

func run(op string, req request, rec *recordingExec) (json.RawMessage, error) {
	list, err := libcni.ConfListFromBytes(req.Conflist)
	if err != nil {
		return nil, err
	}
	cni := libcni.NewCNIConfigWithCacheDir(req.Path, req.CacheDir, rec)
	rt := &libcni.RuntimeConf{ContainerID: req.ContainerID, NetNS: req.NetNS, IfName: req.IfName,
		Args: req.Args, CapabilityArgs: req.CapabilityArgs}
	ctx := context.Background()
	switch op {
	case "add":
		result, err := cni.AddNetworkList(ctx, list, rt)
		if err != nil {
			return nil, err
		}
		return json.Marshal(result)
	case "check":
		return nil, cni.CheckNetworkList(ctx, list, rt)
	case "del":
		return nil, cni.DelNetworkList(ctx, list, rt)
	}
	return nil, fmt.Errorf("unknown operation %q (add, check or del)", op)
}

func main() {
	if len(os.Args) != 2 {
		fmt.Fprintln(os.Stderr, "usage: cnidriver add|check|del < request.json")
		os.Exit(2)
	}
	var req request
	if err := json.NewDecoder(os.Stdin).Decode(&req); err != nil {
		fmt.Fprintln(os.Stderr, "cnidriver: bad request:", err)
		os.Exit(2)
	}
	rec := &recordingExec{}
	result, err := run(os.Args[1], req, rec)
	out := report{Result: result, Calls: rec.calls}
	if err != nil {
		out.Text = err.Error()
		var cniErr *types.Error
		if errors.As(err, &cniErr) {
			out.Error = cniErr
		}
	}
	if out.Calls == nil {
		out.Calls = []call{}
	}
	if err := json.NewEncoder(os.Stdout).Encode(out); err != nil {
		os.Exit(2)
	}
}
