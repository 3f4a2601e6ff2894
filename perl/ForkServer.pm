#!/usr/bin/env perl
package ForkServer;
use strict;
use warnings;

# Find the sibling modules (ForkServer/*.pm, Plack/Handler/ForkServer.pm)
# next to this file, from the repository or from the installed Python
# package (psgi_forkserver/perl/).
use File::Basename ();
use File::Spec ();
BEGIN {
    my $dir = File::Spec->rel2abs(File::Basename::dirname(__FILE__));
    unshift @INC, $dir unless grep { $_ eq $dir } @INC;
}

use ForkServer::Config ();
use ForkServer::EmperorPipe ();
use ForkServer::Log ();

our $VERSION = '0.01';

=head1 NAME

ForkServer - the psgi-forkserver vassal program

=head1 SYNOPSIS

  perl/ForkServer.pm --ini base.ini          # a base vassal (fork-server set)
  perl/ForkServer.pm --http-socket 127.0.0.1:9101 --psgi app.psgi --env APP_NAME=app1

  ForkServer->main(@ARGV);                   # the same from Perl

=head1 DESCRIPTION

A modulino. With C<fork-server> set it runs a base vassal
(L<ForkServer::Base>): it loads C<early-psgi> first, then serves adoption
requests. Otherwise it runs a plain vassal (L<ForkServer::Vassal>) that
loads its app cold. Options are described in docs/CONTRACT.md and
L<ForkServer::Config>.

Under an Emperor (C<UWSGI_EMPEROR_FD> set), every vassal process first
becomes the leader of a new session (L<ForkServer::Session>), so the
Emperor can tell what it leaves behind.

Any error before serving (unknown option, bad value, missing or failing
app, port in use) is one line on stderr naming the vassal, and exit
status 1.

=cut

sub main {
    my ($class, @argv) = @_;
    my $name = ForkServer::Config->guess_name(@argv);
    # First, so that nothing this process starts is born in the Emperor's
    # session (ForkServer::Session). Only under an Emperor: a vassal run by
    # hand from a script stays in the terminal's process group (Ctrl-C).
    if (defined $ENV{UWSGI_EMPEROR_FD}) {
        require ForkServer::Session;
        my ($ok, $why) = ForkServer::Session::lead();
        ForkServer::Log::line($name, "not a session leader ($why): the Emperor cannot tell its orphans") unless $ok;
    }
    my $ok = eval {
        my $emperor = ForkServer::EmperorPipe->pipe_from_env;
        my ($text, $config_fh) = ForkServer::EmperorPipe->config_from_env;
        my $config = ForkServer::Config->from_argv(\@argv, config_text => $text);
        $name = $config->name;
        my %common = (config => $config, emperor => $emperor, config_fh => $config_fh);
        if (defined $config->get('fork-server')) {
            $class->run_base(%common);
        }
        else {
            require ForkServer::Vassal;
            ForkServer::Vassal->new(%common, use_fd0 => 1)->run;
        }
        1;
    };
    if (!$ok) {
        ForkServer::Log::line($name, "error: $@");
        exit 1;
    }
    exit 0;
}

# The codebase first: everything loaded before the fork server exists is
# shared by every adopted vassal. Then the vassal path's own modules.
sub run_base {
    my ($class, %args) = @_;
    my $early = $args{config}->get('early-psgi');
    my $app;
    if (defined $early) {
        require ForkServer::App;
        $app = ForkServer::App::load($early);
    }
    require ForkServer::Base;
    ForkServer::Base->new(%args, app => $app)->run;
    return;
}

__PACKAGE__->main(@ARGV) unless caller;

1;
