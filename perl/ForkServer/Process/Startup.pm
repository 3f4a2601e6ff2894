package ForkServer::Process::Startup;
use strict;
use warnings;

use ForkServer::Config ();
use ForkServer::Vassal::EmperorPipe ();
use ForkServer::Log ();
use ForkServer::Process::Session ();

=head1 NAME

ForkServer::Process::Startup - how a vassal process starts, written once

=head1 SYNOPSIS

  ForkServer::Process::Startup::run(
      argv    => \@argv,          # the vassal's options
      session => 1,               # lead a new session first
      prepare => sub { ... },     # optional: first thing in the guarded part
      before_config => sub { my ($text, %pipes) = @_; ... },   # optional
      run     => sub { my (%args) = @_; ... },   # config, emperor, config_fh
      exit    => sub { POSIX::_exit($_[0]) },    # default: exit
  );    # does not return

=head1 DESCRIPTION

Both kinds of vassal process start the same way: a vassal program the
Emperor started (L<ForkServer>) and a vassal adopted from a base
(L<ForkServer::Base>, after its own C<prepare>: losing the base's
descriptors, replying with its pid).

First, with C<session>, the process becomes the leader of a new session
(L<ForkServer::Process::Session>), before it can start anything, so the Emperor can
tell what it leaves behind. Then, guarded: C<prepare>; the Emperor pipe and
the config pipe from the environment (L<ForkServer::Vassal::EmperorPipe>);
C<before_config> with the config text and the pipes (C<emperor prove>'s test
files leave here); the options from C<argv> on top of the config text
(L<ForkServer::Config>); C<run> with C<config>, C<emperor> and
C<config_fh>.

Any error on the way is one line on stderr naming the vassal
(L<ForkServer::Log>) and exit status 1; the end of C<run> is exit status 0,
standard output and error flushed first (C<exit> may be C<POSIX::_exit>).

=cut

sub run {
    my (%a) = @_;
    my @argv = @{ $a{argv} };
    my $exit = $a{exit} // sub { exit $_[0] };
    my $name = ForkServer::Config->guess_name(@argv);
    if ($a{session}) {
        my ($leads, $why) = ForkServer::Process::Session::lead();
        ForkServer::Log::line($name, "not a session leader ($why): the Emperor cannot tell its orphans") unless $leads;
    }
    my $ok = eval {
        $a{prepare}->() if $a{prepare};
        my %pipes = (emperor => ForkServer::Vassal::EmperorPipe->pipe_from_env);
        (my $text, $pipes{config_fh}) = ForkServer::Vassal::EmperorPipe->config_from_env;
        $a{before_config}->($text, %pipes) if $a{before_config};
        my $config = ForkServer::Config->from_argv(\@argv, config_text => $text);
        $name = $config->name;
        $a{run}->(config => $config, %pipes);
        1;
    };
    if (!$ok) {
        ForkServer::Log::line($name, "error: $@");
        $exit->(1);
    }
    STDOUT->flush;
    STDERR->flush;
    $exit->(0);
}

1;
