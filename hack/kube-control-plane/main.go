// kube-control-plane runs a virtual cluster's kube-apiserver and kube-controller-manager (and,
// where the admin asks for a virtual scheduler, kube-scheduler) in one process: upstream's own
// commands, unchanged, sharing one Go runtime, one copy of their code and of the libraries'
// state. Against two processes it holds about 100 MiB less resident memory per idle cluster
// (docs/benchmarks-notes.md, "One process"). hack/build-upstream.sh builds it from the pinned
// k8s.io/kubernetes module; vkube's supervisor runs it.
//
//	kube-control-plane APISERVER-FLAGS... --- CONTROLLER-MANAGER-FLAGS... [--- SCHEDULER-FLAGS...]
//
// The controller manager (and the scheduler) start once the API server answers /healthz (on its
// own the controller manager gives up after 10 s, which would end the API server too). Any
// command ending ends the process, so the supervisor restarts them all. On SIGTERM the API server
// starts its graceful shutdown, which would wait its full minute for the watches of the
// components beside it (separate processes stopped those first): the process gives requests in
// flight stopGrace, enough for short ones (watches are cut either way), then exits.
//
// At a Kubernetes bump, check that the controller manager still leaves signals alone: with the
// gate ControllerManagerReleaseLeaderElectionLockOnExit on (alpha, off in v1.37) it calls
// genericapiserver.SetupSignalContext, which the API server's command already called, and a
// second call panics. For that reason the scheduler is not run through its cobra command (which
// sets up a signal handler) but through the app package's Setup and Run, as the command does.
package main

import (
	"context"
	"fmt"
	"net/http"
	"os"
	"os/signal"
	"strings"
	"syscall"
	"time"

	"github.com/spf13/pflag"
	"k8s.io/client-go/kubernetes"
	"k8s.io/client-go/tools/cache"
	"k8s.io/client-go/tools/clientcmd"
	logsapi "k8s.io/component-base/logs/api/v1"
	apiserver "k8s.io/kubernetes/cmd/kube-apiserver/app"
	controllermanager "k8s.io/kubernetes/cmd/kube-controller-manager/app"
	scheduler "k8s.io/kubernetes/cmd/kube-scheduler/app"
	scheduleroptions "k8s.io/kubernetes/cmd/kube-scheduler/app/options"
)

const stopGrace = 500 * time.Millisecond

// healthPoll is how often the API server's /healthz is asked before the controller manager starts.
const healthPoll = 100 * time.Millisecond

func main() {
	sections := split(os.Args[1:])
	if len(sections) < 2 || len(sections) > 3 {
		fmt.Fprintln(os.Stderr, "usage: kube-control-plane APISERVER-FLAGS... --- CONTROLLER-MANAGER-FLAGS... [--- SCHEDULER-FLAGS...]")
		os.Exit(2)
	}
	apiArgs, cmArgs := sections[0], sections[1]
	// The commands apply the same logging configuration; the second time must not be an error.
	logsapi.ReapplyHandling = logsapi.ReapplyHandlingIgnoreUnchanged

	stop := make(chan os.Signal, 1)
	signal.Notify(stop, syscall.SIGTERM, syscall.SIGINT)
	go func() {
		<-stop
		time.Sleep(stopGrace)
		os.Exit(0)
	}()

	done := make(chan error, 3)
	a := apiserver.NewAPIServerCommand()
	a.SetArgs(apiArgs)
	go func() { done <- wrap("kube-apiserver", a.Execute()) }()

	go func() {
		if err := waitHealthy(kubeconfigOf(cmArgs)); err != nil {
			done <- wrap("kube-controller-manager", err)
			return
		}
		c := controllermanager.NewControllerManagerCommand()
		c.SetArgs(cmArgs)
		done <- wrap("kube-controller-manager", c.Execute())
	}()

	if len(sections) == 3 {
		go func() {
			if err := waitHealthy(kubeconfigOf(sections[2])); err != nil {
				done <- wrap("kube-scheduler", err)
				return
			}
			done <- wrap("kube-scheduler", runScheduler(sections[2]))
		}()
	}

	if err := <-done; err != nil {
		fmt.Fprintln(os.Stderr, err)
		os.Exit(1)
	}
}

// runScheduler does what kube-scheduler's command does, without its signal handler (see above)
// and without applying its logging flags (the API server's command applied the process's).
func runScheduler(args []string) error {
	opts := scheduleroptions.NewOptions()
	fs := pflag.NewFlagSet("kube-scheduler", pflag.ContinueOnError)
	for _, f := range opts.Flags.FlagSets {
		fs.AddFlagSet(f)
	}
	if err := fs.Parse(args); err != nil {
		return err
	}
	if err := opts.ComponentGlobalsRegistry.Set(); err != nil {
		return err
	}
	name, err := cache.NewInformerName("kube-scheduler")
	if err != nil {
		return err
	}
	opts.InformerName = name
	ctx := context.Background()
	cc, sched, err := scheduler.Setup(ctx, opts)
	if err != nil {
		return err
	}
	return scheduler.Run(ctx, cc, sched)
}

// split cuts the arguments at each "---".
func split(args []string) [][]string {
	sections := [][]string{{}}
	for _, a := range args {
		if a == "---" {
			sections = append(sections, []string{})
			continue
		}
		sections[len(sections)-1] = append(sections[len(sections)-1], a)
	}
	return sections
}

func wrap(name string, err error) error {
	if err == nil {
		return nil
	}
	return fmt.Errorf("%s: %w", name, err)
}

func kubeconfigOf(args []string) string {
	for _, a := range args {
		if v, ok := strings.CutPrefix(a, "--kubeconfig="); ok {
			return v
		}
	}
	return ""
}

// waitHealthy polls the API server's /healthz as a component will reach it, with no
// deadline: the API server's own start may take minutes on a loaded machine. Often: a cluster is
// ready once the controller manager has made the default service account, so each poll interval
// would add half of itself to every start on average (a second: 0.5 s of a 3 s start).
func waitHealthy(kubeconfig string) error {
	if kubeconfig == "" {
		return fmt.Errorf("no --kubeconfig=PATH among a component's flags")
	}
	cfg, err := clientcmd.BuildConfigFromFlags("", kubeconfig)
	if err != nil {
		return err
	}
	cfg.Timeout = 5 * time.Second // a hung connection must not stall the wait
	client, err := kubernetes.NewForConfig(cfg)
	if err != nil {
		return err
	}
	for {
		code := 0
		res := client.Discovery().RESTClient().Get().AbsPath("/healthz").Do(context.Background()).StatusCode(&code)
		if res.Error() == nil && code == http.StatusOK {
			return nil
		}
		time.Sleep(healthPoll)
	}
}
