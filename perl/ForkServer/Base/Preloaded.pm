package ForkServer::Base::Preloaded;
use strict;
use warnings;

=head1 NAME

ForkServer::Base::Preloaded - what an adopted vassal should know about the connections its base left open

=head1 SYNOPSIS

  ForkServer::Log::line($name, $_) for ForkServer::Base::Preloaded::warnings();

=head1 DESCRIPTION

A connection the base opened while it loaded is one socket, shared by the
base and by every vassal forked from it: two processes talking on it at
once mix their queries and replies, and one that closes it (a handle's
C<DESTROY> at exit) closes it for all. DBIx::Class notices the fork and
reconnects by itself; a plain DBI handle kept in a global does not.

C<warnings> returns one line per DBI database handle that is still
connected (C<Active>, found with DBI's own C<visit_handles>), and nothing
when DBI is not loaded. Handles DBIx::Class connected are left out: it
reconnects in each process by itself. docs/frameworks.md shows what works: connect
lazily, or reconnect after the fork, with C<AutoInactiveDestroy>.

=cut

sub warnings {
    return () unless $INC{'DBI.pm'} && DBI->can('visit_handles');
    my @lines;
    DBI->visit_handles(sub {
        my ($h) = @_;
        if (($h->{Type} // '') eq 'db' && $h->{Active} && !_dbic_owns($h)) {
            my $what = join ':', 'dbi', $h->{Driver}{Name} // '?', $h->{Name} // '?';
            push @lines, "a database handle the base opened is still connected ($what): this vassal "
                . "shares its connection with the base and every other vassal; connect after the fork "
                . "or reconnect in the vassal, with AutoInactiveDestroy (docs/frameworks.md)";
        }
        return 1;
    });
    return @lines;
}

# DBIx::Class marks the handles it connects with its own error handler (a
# blessed sub), and checks the pid before each use: it leaves an inherited
# connection alone and opens its own.
sub _dbic_owns {
    my ($h) = @_;
    return ref($h->{HandleError} // '') eq '__DBIC__DBH__ERROR__HANDLER__';
}

1;
