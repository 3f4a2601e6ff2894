package ForkServer::Log;
use strict;
use warnings;

=head1 NAME

ForkServer::Log - one line on stderr, prefixed with the vassal's name

=head1 SYNOPSIS

  ForkServer::Log::line($name, "refused request from pid 12 uid 1000: wrong modifier1 0");

=head1 DESCRIPTION

Multi-line messages (a die from a PSGI file, say) are folded into one line,
so that the Emperor's log shows one event per line. Written with one
syswrite: no buffer to be duplicated by a fork.

=cut

sub line {
    my ($name, $msg) = @_;
    $msg = "$msg";
    $msg =~ s/\s+\z//;
    $msg =~ s/\s*\n\s*/ | /g;
    syswrite STDERR, "psgi-vassal $name: $msg\n";
    return;
}

1;
