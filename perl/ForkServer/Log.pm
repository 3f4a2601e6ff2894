package ForkServer::Log;
use strict;
use warnings;

use POSIX ();

=head1 NAME

ForkServer::Log - one line on stderr, prefixed with the vassal's name

=head1 SYNOPSIS

  ForkServer::Log::line($name, "refused request from pid 12 uid 1000: wrong modifier1 0");

=head1 DESCRIPTION

Multi-line messages (a die from a PSGI file, say) are folded into one line,
so that the Emperor's log shows one event per line. Written with one
write(2) on descriptor 2: no buffer to be duplicated by a fork.

=head2 write_fd($fh, $text)

One write(2) of C<$text> on the descriptor under C<$fh>, whatever PerlIO
layers an app put on the handle (Catalyst's setup and C<use open qw(:std
:encoding(UTF-8))> put C<:encoding(UTF-8)> on STDERR, where Perl's own
C<syswrite> dies). A text string is written as UTF-8, bytes as they are.
Returns what write(2) returned.

=cut

sub line {
    my ($name, $msg) = @_;
    $msg = "$msg";
    $msg =~ s/\s+\z//;
    $msg =~ s/\s*\n\s*/ | /g;
    write_fd(\*STDERR, "psgi-vassal $name: $msg\n");
    return;
}

sub write_fd {
    my ($fh, $text) = @_;
    my $fd = fileno($fh) // return undef;
    utf8::encode($text) if utf8::is_utf8($text);
    my $n;
    do { $n = POSIX::write($fd, $text, length $text) } while (!defined $n && $!{EINTR});
    return $n;
}

1;
