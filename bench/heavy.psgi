# The benchmark's "real codebase": an object system, an ORM with a schema,
# two web frameworks, a template engine with a compiled template, and every
# time zone. About a second and 120+ MB to load on the project's machines.
use strict;
use warnings;

use Moose ();
use DBIx::Class ();
use Catalyst ();
use Mojolicious ();
use Dancer2 ();
use DateTime;
use DateTime::TimeZone;
use Template;
use JSON::XS ();

package Bench::Schema::Result::Account {
    use base 'DBIx::Class::Core';
    __PACKAGE__->table('account');
    __PACKAGE__->add_columns(
        id    => { data_type => 'integer', is_auto_increment => 1 },
        email => { data_type => 'text' },
        tz    => { data_type => 'text' },
    );
    __PACKAGE__->set_primary_key('id');
}

package Bench::Schema {
    use base 'DBIx::Class::Schema';
    __PACKAGE__->register_class(Account => 'Bench::Schema::Result::Account');
}

package Bench::Clock {
    use Moose;
    has zone => (is => 'ro', isa => 'Str', default => 'UTC');
    sub now { DateTime->now(time_zone => $_[0]->zone) }
    __PACKAGE__->meta->make_immutable;
}

package main;

# Load every zone as a large codebase loads its data at start-up.
DateTime::TimeZone->new(name => $_) for DateTime::TimeZone->all_names;

my $template = Template->new;
my $page     = "[% app %] [% pid %] [% now %]\n";
my $clock    = Bench::Clock->new(zone => 'Europe/Paris');

my $app = sub {
    my ($env) = @_;
    if ($env->{PATH_INFO} eq '/hello') {
        return [200, ['Content-Type' => 'text/plain'], ["hello\n"]];
    }
    my $out = '';
    $template->process(\$page, { app => $ENV{APP_NAME} // 'heavy', pid => $$, now => $clock->now->iso8601 }, \$out)
        or return [500, ['Content-Type' => 'text/plain'], [$template->error . "\n"]];
    return [200, ['Content-Type' => 'text/plain'], [$out]];
};

$app;
