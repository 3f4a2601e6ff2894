package ForkServer::Spares::Solo;
use strict;
use warnings;

use Socket qw(MSG_PEEK MSG_DONTWAIT);
use ForkServer::Base::Priority ();
use ForkServer::Protocol qw(MASK_CONFIG);
use ForkServer::Log ();
use ForkServer::Process::Exit ();
use ForkServer::Vassal ();
use ForkServer::Vassal::EmperorPipe ();

=head1 NAME

ForkServer::Spares::Solo - a spare's warm worker that becomes a C<master = false> vassal itself

=head1 SYNOPSIS

  # in the warm worker, started from the base's request and the requester
  # (ForkServer::Spares::WorkerStart), its pid replied, its session its own:
  ForkServer::Spares::Solo::serve(app => $app, sock => $listening, config => $config,
                                  spare_link => $link);    # does not return

=head1 DESCRIPTION

A C<master = false> vassal is one process. Adopted from a warm spare, that
process is the spare's warm worker, which ran the base's C<early-warmup>
paths: its first request finds what the warm-up built (the app's lazily
built state, its pages already copied), where the spare's own process
would pay for it.

Given the base's request with the requester's connection
(L<ForkServer::Spares/take>), the worker reads the vassal's config as the
master would, applies it (C<env>, C<chdir>, title, output) and judges its
warm-up by the rules of spares (L<ForkServer::Spares::Worker/unfit>: the
same identity, directory and values of the C<%ENV> keys the warm-up read).
One that fits tells its spare (which then lets go of everything the base
gave it), replies with its own pid, leads its own session, and is the
vassal from here:
the Emperor pipe and the config pipe are its own, nothing of its spare's
stays open, and it serves as L<ForkServer::HTTPServer::Solo>. One that does
not fit replies with its spare's pid and leaves: the spare's process serves,
with none of the warm-up's state.

Its priority: raised while it waited, as a warm worker's is, and its new
session's scheduling group raised as its spare's was; both go back to the
default once its first request is served (or a second after it accepts):
from then on it runs as any other vassal. Its spare leaves then too (until
then it waits, titled C<psgi-vassal NAME (spare of BASEPID, leaving)>, no
spare to the Emperor): its exit does not compete with the first request.

=cut

=head2 let_spare_go($link)

The spare waits for this word to leave (L<ForkServer::Spares::Process>):
its exit, the unmapping of an address space as large as the base's, comes
after the vassal's first request rather than beside it.

=cut

use constant SPARE_MAY_GO => 'L';

sub let_spare_go {
    my ($link) = @_;
    return unless $link && $link->opened;
    local $SIG{PIPE} = 'IGNORE';
    syswrite $link, SPARE_MAY_GO;
    close $link;
    return;
}

=head2 may_be_solo($request) -> bool

In the base (L<ForkServer::Spares/take>): whether the vassal may be C<master = false>, judged cheaply on the base's
path: its argv names C<master>, or the config packet waiting in its config
pipe (peeked at: it stays there) sets it false, or that packet is not
there yet. The warm worker reads the config and decides; a vassal judged
wrongly here is only served the slower way (its spare's own process, or a
pid reply that waits for the worker).

=cut

use constant SOLO_PEEK => 8192;    # bytes of the config packet looked at

sub may_be_solo {
    my ($req) = @_;
    my (undef, @argv) = $req->argv;
    return 1 if grep { /\A--?master(?:=|\z)/ } @argv;
    my (undef, $config_fd) = $req->fds_by_role;
    return 0 unless defined $config_fd && $req->mask & MASK_CONFIG;
    open(my $fh, '+<&', $config_fd) or return 0;    # a copy: the request keeps its own
    # no room for the output pipe it carries: left in the packet, not taken
    my $got = recv($fh, my $text, SOLO_PEEK, MSG_PEEK | MSG_DONTWAIT);
    close $fh;
    return 1 unless defined $got && length $text;
    return $text =~ /^[ \t]*master[ \t]*=[ \t]*(?:0|false|no|off)[ \t]*\r?$/mi ? 1 : 0;
}

sub serve {
    my (%a) = @_;
    my $config = $a{config};
    my $ok = eval {
        # for the rest of the vassal's life, as for an adopted one
        $SIG{PIPE} = 'IGNORE';
        my $emperor = ForkServer::Vassal::EmperorPipe->pipe_from_env;
        # the config packet was only peeked at: read now, as the master would
        my (undef, $config_fh) = ForkServer::Vassal::EmperorPipe->config_from_env;
        ForkServer::Process::Exit::without_global_destruction();
        ForkServer::Vassal->new(
            config        => $config,
            emperor       => $emperor,
            config_fh     => $config_fh,
            preloaded_app => $a{app},
            configured    => 1,
            listen_sock   => $a{sock},
            # the base's priority for its first request, as a warm worker
            # serving for its master has it until its master is set up
            settle        => sub { ForkServer::Base::Priority::back($$); let_spare_go($a{spare_link}) },
        )->run;
        1;
    };
    ForkServer::Log::line($config->name, "error: $@") unless $ok;
    let_spare_go($a{spare_link});
    STDOUT->flush;
    STDERR->flush;
    exit($ok ? 0 : 1);
}

1;
