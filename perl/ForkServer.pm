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

# First: its END block, the last to run, is how a forked process exits.
use ForkServer::Process::Exit ();
use ForkServer::Process::Startup ();
# GLIBC_TUNABLES as malloc read it, before an app can change %ENV
# (ForkServer::Base::HugePages, loaded by a base only)
our $GLIBC_TUNABLES_AT_START;
BEGIN { $GLIBC_TUNABLES_AT_START = $ENV{GLIBC_TUNABLES} }

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
becomes the leader of a new session (L<ForkServer::Process::Session>), so the
Emperor can tell what it leaves behind.

Any error before serving (unknown option, bad value, missing or failing
app, port in use) is one line on stderr naming the vassal, and exit
status 1. That start-up sequence is L<ForkServer::Process::Startup>'s, the same for
a vassal adopted from a base.

=cut

sub main {
    my ($class, @argv) = @_;
    ForkServer::Process::Startup::run(
        argv => \@argv,
        # Only under an Emperor: a vassal run by hand from a script stays in
        # the terminal's process group (Ctrl-C).
        session => defined $ENV{UWSGI_EMPEROR_FD},
        run     => sub {
            my (%common) = @_;
            return $class->run_base(%common) if defined $common{config}->get('fork-server');
            # a plain vassal loads its app itself: no base's descriptor to keep
            die "keep-fd: only a vassal adopted from a base keeps one of the base's descriptors\n"
                if $common{config}->list('keep-fd');
            require ForkServer::Vassal;
            ForkServer::Vassal->new(%common, use_fd0 => 1)->run;
        },
    );
}

# Whether a base's vassals are web vassals, whose modules (the HTTP server,
# spares, warm-up) it loads before forking them. A base for test files
# (ForkServer::Prove::TestFile) sets it false: it needs none of them.
our $WEB_VASSALS = 1;

# The codebase first: everything loaded before the fork server exists is
# shared by every adopted vassal. Then the vassal path's own modules.
sub run_base {
    my ($class, %args) = @_;
    my $config = $args{config};
    my $early = $config->get('early-psgi');
    my $app;
    # before the codebase loads: frameworks pick their mode as they build the app
    $ENV{PLACK_ENV} = $config->plack_env;
    # env and chdir too, as uWSGI applies them before it loads the app (and
    # every vassal forked from the base inherits them); the Emperor finds
    # a relative fork-server socket in the vassals directory, where we are now
    require ForkServer::Process::Environment;
    my $socket = $config->get('fork-server');
    $config->set('fork-server', File::Spec->rel2abs($socket))
        if defined $config->get('chdir') && !File::Spec->file_name_is_absolute($socket);
    ForkServer::Process::Environment::apply_env($config);
    ForkServer::Process::Environment::apply_chdir($config);
    if (defined $early) {
        require ForkServer::Vassal::App;
        $app = ForkServer::Vassal::App::load($early);
    }
    if ($WEB_VASSALS) {    # the vassal path's own modules, shared by every vassal
        require ForkServer::Vassal;
        require ForkServer::Spares;
        require ForkServer::Base::Warmup;
    }
    require ForkServer::Base;
    my $base = ForkServer::Base->new(%args, app => $app);
    # what adopted vassals did not create themselves; the base object, and
    # the app it holds, are theirs to use, not to free as they leave
    ForkServer::Process::Exit::mark_base($base);
    $base->run;
    return;
}

__PACKAGE__->main(@ARGV) unless caller;

1;
